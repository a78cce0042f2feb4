from .checkpoint import (
                         allow_full_checkpoint_loading,
                         extract_state_dict,
                         load_checkpoint_file,
                         load_state_dict_report,
)

__all__ = [
    'allow_full_checkpoint_loading', 'extract_state_dict', 'load_checkpoint_file',
    'load_state_dict_report'
]
