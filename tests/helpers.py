"""What several test modules share: the repository root and loading scripts of tools/."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_tool(relative: str) -> ModuleType:
    """Import a script under tools/ (e.g. 'tools/misc/make_toy_dataset.py') as a module; its
    folder is on sys.path while it loads, so it can import its siblings."""
    path = ROOT / relative
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
