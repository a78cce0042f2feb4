"""Config preparation shared by tools/train.py and tools/test.py (mmdet or mmseg configs)."""
import os.path as osp
from typing import Any, Optional

import torch
from mmengine.config import Config, DictAction  # noqa: F401  (DictAction re-exported for tools)
from mmengine.logging import print_log

from ..engine import EagerOptimizerHook, compile_options

SUPPORTED_SCOPES = ('mmdet', 'mmseg')


def config_scope(cfg: Config) -> str:
    """The OpenMMLab codebase a config belongs to, from its ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in SUPPORTED_SCOPES:
        raise ValueError(f'config default_scope={scope!r} is not supported; allowed values: '
                         f'{SUPPORTED_SCOPES} (inherit an mmdet or mmseg base config)')
    return scope


def replace_sync_bn(node: Any) -> int:
    """Turn every ``type='SyncBN'`` norm config into ``'BN'`` in place; return how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += replace_sync_bn(value)
    return count


def prepare_config(config: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                   work_dir: Optional[str] = None) -> Config:
    """Load a config, apply ``--cfg-options``, set launcher and work dir, and register modules.

    SyncBN needs CUDA: without it (CPU runs, also distributed with gloo) the model's SyncBN
    layers become BN, with a warning saying so, and a ``pytorch``-launched run uses gloo.
    """
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = config_scope(cfg)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    if not torch.cuda.is_available():
        if launcher == 'pytorch':
            init_cpu_distributed(cfg)
        converted = replace_sync_bn(cfg.model)
        if converted:
            print_log(f'CUDA is not available: {converted} SyncBN layer config(s) switched to BN '
                      '(override with a GPU run, or set norm_cfg explicitly)',
                      logger='current', level=30)
    register_scope(scope)
    return cfg


def init_cpu_distributed(cfg: Config) -> None:
    """Start a gloo process group for a CPU run under torchrun (``--launcher pytorch``).

    mmengine's pytorch launcher calls ``torch.cuda.set_device``, and DDP's default
    ``device_ids`` name a GPU; without CUDA both fail, so the group is started here and DDP wraps
    the CPU module.
    """
    import torch.distributed as dist
    cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.setdefault('model_wrapper_cfg', dict(type='MMDistributedDataParallel'))
    cfg.model_wrapper_cfg['device_ids'] = None
    if not dist.is_initialized():
        dist.init_process_group('gloo')


def shut_down_distributed() -> None:
    """Destroy the default process group, if one was started, once every rank got here.

    Left to interpreter shutdown, gloo's worker threads may still hold tensors whose release
    needs the interpreter, and the process aborts after an otherwise successful run (torchrun
    then reports the job as failed). Call it after ``runner.train()`` / ``runner.test()``.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def register_scope(scope: str) -> None:
    """Import the codebase's modules and ours into the registries, with ``scope`` as default."""
    import mmvit_plugins  # noqa: F401
    if scope == 'mmdet':
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)


def configure_amp(cfg: Config, enable: bool = False) -> None:
    """Mixed precision for tools/train.py, in place.

    ``enable`` (``--amp``) turns mmengine's ``AmpOptimWrapper`` on: float16 autocast with a
    dynamic loss scale, unless the config already chose an AMP wrapper (its settings are kept).
    Without CUDA, an ``AmpOptimWrapper`` (from ``--amp`` or the config) becomes
    ``CPUAmpOptimWrapper``: CPU autocast runs in bfloat16 only, which needs no loss scale; for
    a detector only its backbone and neck run under autocast (mmcv's CPU NMS and RoIAlign have
    no bfloat16 kernels). A warning says so. With CUDA the config is mmengine's, unchanged.
    """
    wrapper = cfg.optim_wrapper
    if enable:
        if wrapper.get('type', 'OptimWrapper') in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
            print_log('--amp: AMP training is already enabled in the config', logger='current')
        else:
            wrapper.type = 'AmpOptimWrapper'
            wrapper.loss_scale = 'dynamic'
            wrapper.dtype = 'float16'
    if wrapper.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
        dtype = wrapper.pop('dtype', None)
        for key in ('loss_scale', 'use_fsdp'):
            wrapper.pop(key, None)
        wrapper.type, wrapper.dtype = 'CPUAmpOptimWrapper', 'bfloat16'
        if config_scope(cfg) == 'mmdet':
            wrapper.setdefault('autocast_modules',
                               [m for m in ('backbone', 'neck') if m in cfg.model])
        parts = wrapper.get('autocast_modules') or 'the whole model'
        print_log(f'CUDA is not available: AmpOptimWrapper (dtype={dtype}) switched to '
                  f'CPUAmpOptimWrapper (bfloat16 autocast of {parts}, no loss scale)',
                  logger='current', level=30)


def configure_compile(cfg: Config) -> None:
    """``torch.compile`` for tools/train.py, in place, from mmengine's ``compile`` option
    (``True`` or a dict of ``torch.compile`` keyword arguments; checked here).

    A segmentor keeps mmengine's meaning, its whole ``train_step`` compiled, with
    ``EagerOptimizerHook`` added, which keeps the optimizer step out of dynamo. A detector's
    training step cannot be captured (data-dependent proposal counts; dynamo fails in mmengine's
    ``InstanceData``): its ``compile`` becomes a ``CompileModulesHook`` compiling backbone and
    neck with the same options, and a message says so.
    """
    option = cfg.get('compile')
    if option is None or option is False:
        return
    options = compile_options(option)
    hooks = cfg.setdefault('custom_hooks', [])
    if config_scope(cfg) == 'mmdet':
        modules = [name for name in ('backbone', 'neck') if name in cfg.model]
        cfg.compile = None
        hooks.append(dict(type='CompileModulesHook', modules=modules, **options))
        print_log(f'compile={option!r}: a detector\'s training step has data-dependent shapes, so '
                  f'{" and ".join(modules)} are compiled (CompileModulesHook) instead of the '
                  'whole train_step', logger='current')
    elif not any(hook.get('type') in ('EagerOptimizerHook', EagerOptimizerHook)
                 for hook in hooks):
        hooks.append(dict(type='EagerOptimizerHook'))


def seed_from_checkpoint(cfg: Config, checkpoint: Optional[str], trust: bool = False) -> None:
    """Resuming with no seed in the config: take the interrupted run's (its ``meta['seed']``).

    mmengine adopts the checkpoint's seed only after it built the data sampler and workers
    with a fresh one, so without this the resumed run draws other data and augmentations.
    """
    randomness = dict(cfg.get('randomness') or {})
    if not cfg.get('resume') or checkpoint is None or randomness.get('seed') is not None:
        return
    from mmvit_plugins.checkpoint import load_checkpoint_file
    meta = load_checkpoint_file(checkpoint, trust=trust).get('meta') or {}
    if meta.get('seed') is not None:
        cfg.randomness = dict(randomness, seed=meta['seed'])
        print_log(f"resuming with the seed of {checkpoint}: {meta['seed']} (the config sets "
                  'none)', logger='current')
