"""The checkpoint functions under their earlier import path, kept for users' scripts that import
them from here: a re-export of :mod:`mmvit_plugins.checkpoint`, where they live (and are
documented)."""
from mmvit_plugins.checkpoint import (  # noqa: F401
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
