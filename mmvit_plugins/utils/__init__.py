from .checkpoint import (
    LoadReport,
    UnsafeCheckpointError,
    check_finite,
    describe_keys,
    extract_state_dict,
    file_sha256,
    key_family,
    load_checkpoint_file,
    load_state_dict_report,
    safe_globals,
    safe_mmengine_loading,
)

__all__ = [
    'LoadReport', 'UnsafeCheckpointError', 'check_finite', 'describe_keys', 'extract_state_dict',
    'file_sha256', 'key_family', 'load_checkpoint_file', 'load_state_dict_report', 'safe_globals',
    'safe_mmengine_loading'
]
