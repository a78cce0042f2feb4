"""What tools/deployment/deploy.py and test.py share: loading a deploy config with its model
config, with a clear error for each argument that cannot work. Needs mmdeploy."""
import os
import os.path as osp
from typing import Optional, Sequence, Tuple

import torch
from mmengine.config import Config

SUPPORTED_CODEBASES = ('mmdet', 'mmseg')
SUPPORTED_IR = 'onnx'


def check_file(path: str, arg: str, kind: str = 'file') -> str:
    """``path`` if it is an existing file, else a FileNotFoundError naming ``arg``."""
    if not osp.isfile(path):
        what = 'a directory, not a file' if osp.isdir(path) else 'not found'
        raise FileNotFoundError(f'{arg}={path!r}: {kind} {what}')
    return path


def check_image(path: str, arg: str = 'IMG') -> str:
    """``path`` if it is a readable image, else an error naming ``arg``."""
    import mmcv
    check_file(path, arg, 'image')
    if mmcv.imread(path) is None:
        raise ValueError(f'{arg}={path!r}: not an image that OpenCV can read')
    return path


def installed_backends() -> Sequence[str]:
    """Names of mmdeploy backends whose runtime is installed."""
    from mmdeploy.backend.base import get_backend_manager
    from mmdeploy.utils import Backend
    names = []
    for name in sorted(backend.value for backend in Backend):
        manager = get_backend_manager(name)
        try:
            if manager is not None and manager.is_available():
                names.append(name)
        except Exception:  # a manager that cannot even check (missing SDK pieces)
            continue
    return names


def load_deploy_configs(deploy_cfg: str, model_cfg: str,
                        cfg_options: Optional[dict] = None) -> Tuple[Config, Config]:
    """Both configs, checked against each other and the installed backends.

    Errors (naming the argument): either file missing; a deploy config without
    ``codebase_config``/``backend_config``; an intermediate representation other than ONNX; a
    deploy config for another codebase than the model config's ``default_scope``; a backend
    whose runtime is not installed. Without CUDA, SyncBN layers of the model config become BN.
    """
    from mmdeploy.utils import get_backend, get_codebase_config, get_ir_config, load_config

    from mmvit_plugins.utils.runtime import register_scope, replace_sync_bn
    check_file(deploy_cfg, 'DEPLOY_CFG', 'deploy config')
    check_file(model_cfg, 'MODEL_CFG', 'model config')
    deploy, model = load_config(deploy_cfg, model_cfg)
    if cfg_options:
        model.merge_from_dict(cfg_options)
    codebase = get_codebase_config(deploy).get('type')
    if codebase is None or 'backend_config' not in deploy:
        raise ValueError(f'DEPLOY_CFG={deploy_cfg!r} is not an mmdeploy deploy config: it needs '
                         'codebase_config and backend_config (see configs/deploy/)')
    ir_type = get_ir_config(deploy).get('type')
    if ir_type != SUPPORTED_IR:
        raise ValueError(f'DEPLOY_CFG={deploy_cfg!r}: ir_config type={ir_type!r} is not '
                         f'supported; allowed values: {[SUPPORTED_IR]}')
    scope = model.get('default_scope')
    if scope not in SUPPORTED_CODEBASES:
        raise ValueError(f'MODEL_CFG={model_cfg!r} has default_scope={scope!r}; allowed '
                         f'values: {SUPPORTED_CODEBASES}')
    if codebase != scope:
        raise ValueError(
            f'DEPLOY_CFG={deploy_cfg!r} is for codebase {codebase!r}, but MODEL_CFG='
            f'{model_cfg!r} is an {scope} config (default_scope={scope!r}); use a deploy '
            f'config for {scope} (configs/deploy/{scope}/)')
    try:
        backend = get_backend(deploy).value
    except KeyError as err:
        raise ValueError(f'DEPLOY_CFG={deploy_cfg!r}: backend_config.type='
                         f'{deploy.backend_config.get("type")!r} is not an mmdeploy backend; '
                         f'installed backends: {list(installed_backends())}') from err
    from mmdeploy.backend.base import get_backend_manager
    manager = get_backend_manager(backend)
    if manager is None or not manager.is_available():
        raise ValueError(f'DEPLOY_CFG={deploy_cfg!r} needs the {backend!r} backend, which is '
                           f'not installed; installed backends: {list(installed_backends())} '
                           '(onnxruntime: pip install mmvit-plugins[deploy])')
    if not torch.cuda.is_available():
        replace_sync_bn(model.model)
    register_scope(scope)
    return deploy, model


def check_device(device: str) -> str:
    """``device`` if torch can use it, else a ValueError naming ``--device``."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f'--device={device!r} is not a torch device (e.g. cpu, cuda:0)') from err
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device={device!r}: CUDA is not available; use --device cpu')
    return device


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
