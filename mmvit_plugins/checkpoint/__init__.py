"""Reading checkpoints safely, taking the weights out of every public layout, and loading them
with a report of what did not match.

Every checkpoint is treated as hostile. It is read with ``torch.load(weights_only=True)``, which
builds tensors and plain containers only; the globals in ``safe_globals()`` (numpy values and
arrays, ``argparse.Namespace``, sets, mmengine's ``HistoryBuffer``) are allow-listed for the
duration of the load and nothing else, so public checkpoints and mmengine's training checkpoints
(message hub, optimizer, schedulers) load, and a file whose pickle names anything else is refused
with an ``UnsafeCheckpointError`` naming the file and the global. Loading such a file anyway is an
explicit choice per file (``trust=True``: ``trust_checkpoint=True`` in a backbone's ``init_cfg``,
``--trust-checkpoint`` for the tools).

torch versions: >= 2.4 as above (the allow-list is added to torch's list for the load and the
previous list is restored afterwards); 1.13-2.3 (``weights_only`` without an extensible
allow-list) load tensors and plain containers only and refuse anything else, saying that torch
>= 2.4 would allow-list it; < 1.13 has no safe loader, so only trusted files load there.

One concern per module: ``safe_load`` (the allow-list, what a file is, ``torch.load``),
``transport`` (paths, URLs and mmengine's schemes), ``state_dict`` (the weights inside a
checkpoint), ``key_layouts`` (which backbone family its keys belong to, as each backbone
declares) and ``report`` (loading into a module, and what did not match).
"""
from .key_layouts import KeyLayout, describe_keys, key_family, other_family, register_key_layouts
from .report import LoadReport, convert_state_dict, load_state_dict_report
from .safe_load import TRUST_HINT, UnsafeCheckpointError, safe_globals
from .state_dict import check_finite, extract_state_dict
from .transport import file_sha256, load_checkpoint_file, safe_mmengine_loading

__all__ = [
    'KeyLayout', 'LoadReport', 'TRUST_HINT', 'UnsafeCheckpointError', 'check_finite',
    'convert_state_dict', 'describe_keys', 'extract_state_dict', 'file_sha256', 'key_family',
    'load_checkpoint_file', 'load_state_dict_report', 'other_family', 'register_key_layouts',
    'safe_globals', 'safe_mmengine_loading'
]
