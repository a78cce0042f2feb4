"""Every way the project reads a checkpoint is safe by default and names what is wrong: a
backbone's ``init_cfg`` Pretrained, both model converters, ``tools/train.py`` (--resume,
load_from) and ``tools/test.py``. A malicious pickle written here must not run; a file that needs
more than tensors and plain containers loads only when trusted explicitly; an mmengine training
checkpoint resumes without trust."""
import hashlib
import logging
import os
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import CheckpointLoader

from mmvit_plugins.checkpoint import UnsafeCheckpointError, load_checkpoint_file
from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin, MAFormer, RefinerViT

from .conftest import TINY_BACKBONES
from .helpers import ROOT, load_tool
from .test_boat import _fake_public_checkpoint, _public_swin_keys
from .test_checkpoint_utils import (  # noqa: F401 (logged: a fixture)
    Custom,
    Payload,
    _messages,
    _save_to,
    logged,
)
from .test_refiner_vit import TINY as REFINER_TINY
from .test_refiner_vit import public_state_dict

SWIN_TINY = TINY_BACKBONES['BOATSwin']['arch']


def _swin(**kwargs) -> BOATSwin:
    return BOATSwin(**{**TINY_BACKBONES['BOATSwin'], **kwargs})


def _public_swin() -> dict:
    return _fake_public_checkpoint(_swin(), _public_swin_keys(SWIN_TINY['depths']))


# -- backbones: init_cfg=dict(type='Pretrained', ...) -----------------------------------------
def test_backbone_refuses_a_malicious_checkpoint_unless_trusted(tmp_path):
    marker = tmp_path / 'MARKER'
    evil = _save_to(tmp_path / 'evil.pth', {'model': _public_swin(), 'x': Payload(marker)})
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=evil))
    with pytest.raises(UnsafeCheckpointError, match=r"'.*evil.pth' was refused .*needs posix"):
        model.init_weights()
    assert not marker.exists()

    public = _public_swin()
    custom = _save_to(tmp_path / 'custom.pth', {'model': public, 'extra': Custom(2)})
    with pytest.raises(UnsafeCheckpointError, match='test_checkpoint_utils.Custom'):
        _swin(init_cfg=dict(type='Pretrained', checkpoint=custom)).init_weights()
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=custom, trust_checkpoint=True))
    model.init_weights()
    assert model.load_report.ok, model.load_report.format()
    torch.testing.assert_close(model.patch_embed.proj.weight, public['patch_embed.proj.weight'])


@pytest.mark.parametrize('init_cfg, match', [
    (dict(trust_checkpoints=True), r"unknown keys \['trust_checkpoints'\]; allowed keys: "),
    (dict(trust_checkpoint='yes'), r"trust_checkpoint='yes' is invalid; allowed values: True"),
])
def test_pretrained_init_cfg_keys_are_checked(tmp_path, init_cfg, match):
    path = _save_to(tmp_path / 'w.pth', {'model': _public_swin()})
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=path, **init_cfg))
    with pytest.raises(ValueError, match=match):
        model.init_weights()


def test_ema_only_checkpoint_loads_and_says_so(tmp_path, logged):  # noqa: F811
    public = {f'module.{k}': v for k, v in _public_swin().items()}
    path = _save_to(tmp_path / 'ema.pth.tar', {'state_dict_ema': public, 'epoch': 300})
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert model.load_report.ok
    assert "using the EMA weights 'state_dict_ema' (the checkpoint holds no other weights)" in \
        _messages(logged, logging.INFO)


def test_pretrained_url_goes_through_the_safe_loader(tmp_path, monkeypatch):
    good = _save_to(tmp_path / 'good.pth', {'model': _public_swin()})
    marker = tmp_path / 'MARKER'
    evil = _save_to(tmp_path / 'evil.pth', {'model': _public_swin(), 'x': Payload(marker)})
    served = {'https://host/good.pth': good, 'https://host/evil.pth': evil}
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file',
                        lambda url, dst, *args, **kwargs: os.link(served[url], dst))
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint='https://host/good.pth'))
    model.init_weights()
    assert model.load_report.ok
    with pytest.raises(UnsafeCheckpointError, match='https://host/evil.pth'):
        _swin(init_cfg=dict(type='Pretrained', checkpoint='https://host/evil.pth')).init_weights()
    assert not marker.exists()


def _converted(cls, **kwargs) -> dict:
    name = cls.__name__
    return cls(**{**TINY_BACKBONES[name], **kwargs}).state_dict()


@pytest.mark.parametrize('checkpoint, cls, looks_like', [
    (_public_swin, BOATCSWin, r'BOAT-Swin, public layout \(embed_dims 8, depths \(2, 2, 2, 1\)\)'),
    (_public_swin, RefinerViT, r'BOAT-Swin, public layout'),
    (lambda: public_state_dict(48, 4, 4, 2.), MAFormer, r'Refiner-ViT, public layout'),
    (lambda: _converted(MAFormer), BOATSwin, r'MAFormer \(embed_dims 16'),
    (lambda: _converted(BOATCSWin), RefinerViT, r'BOAT-CSWin, converted layout'),
    (lambda: _converted(BOATSwin, arch=dict(SWIN_TINY, embed_dims=16)), BOATSwin,
     r'BOAT-Swin, converted layout \(embed_dims 16, .*the model is BOAT-Swin, converted layout '
     r'\(embed_dims 8'),
], ids=['swin>cswin', 'swin>refiner', 'refiner>maformer', 'maformer>swin', 'cswin>refiner',
        'swin-wider>swin'])
def test_checkpoint_of_another_family_or_size_is_an_error(tmp_path, checkpoint, cls, looks_like):
    path = _save_to(tmp_path / 'other.pth', {'state_dict': checkpoint()})
    model = cls(**TINY_BACKBONES[cls.__name__], init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError) as error:
        model.init_weights()
    message = str(error.value)
    # another family: refused whatever share matches; the same family: below 50 %
    same_family = looks_like.startswith('BOAT-Swin, converted') and cls is BOATSwin
    why = (r'only \d+ of its \d+ tensors matched \(fewer than 50%\)' if same_family else
           r'its keys are [\w-]+ weights, the model is [\w-]+: weights of another family are '
           r'never loaded \(\d+ of its \d+ tensors would match\)')
    assert re.search(rf"checkpoint '.*other.pth' does not fit {cls.__name__}: {why}",
                     message), message
    assert re.search(f'The checkpoint looks like {looks_like}', message), message


def test_bias_tables_of_wrong_shapes_are_listed_not_a_crash(tmp_path, logged):  # noqa: F811
    public = _public_swin()
    bad = 'layers.0.blocks.0.attn.relative_position_bias_table'
    other_heads = 'layers.2.blocks.1.attn.relative_position_bias_table'
    public[bad] = torch.randn(170, 2)  # no ((2w-1)**2, heads) table: crashed in the resize
    public[other_heads] = torch.randn(169, 5)
    path = _save_to(tmp_path / 'odd.pth', {'model': public})
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    mismatched = model.load_report.mismatched
    assert ('stages.0.blocks.0.attn.relative_position_bias_table: checkpoint (170, 2) vs model '
            '(169, 1)') in mismatched
    assert ('stages.2.blocks.1.attn.relative_position_bias_table: checkpoint (169, 5) vs model '
            '(169, 2)') in mismatched
    warned = _messages(logged, logging.WARNING)
    assert 'BOATSwin: loaded' in warned and 'shape mismatch (not loaded): ' in warned


def test_nan_weights_are_refused(tmp_path):
    public = _public_swin()
    public['layers.1.blocks.0.mlp.fc1.weight'][0, 0] = float('nan')
    path = _save_to(tmp_path / 'nan.pth', {'model': public})
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in 1 tensor\(s\): "
                                         r'layers.1.blocks.0.mlp.fc1.weight'):
        _swin(init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()


# -- model converters --------------------------------------------------------------------------
boat2mmvit = load_tool('tools/model_converters/boat2mmvit.py')
refiner2mmvit = load_tool('tools/model_converters/refiner2mmvit.py')


@pytest.mark.parametrize('converter, args', [
    (boat2mmvit, ['--model', 'swin']), (boat2mmvit, ['--model', 'cswin']), (refiner2mmvit, [])])
def test_converters_refuse_malicious_checkpoints(tmp_path, converter, args):
    marker = tmp_path / 'MARKER'
    evil = _save_to(tmp_path / 'evil.pth.tar', {'state_dict': {}, 'x': Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match='--trust-checkpoint'):
        converter.main([evil, str(tmp_path / 'out.pth'), *args])
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


@pytest.fixture
def tiny_converters(monkeypatch):
    """The converters with tiny archs (their presets would build full-size models)."""
    monkeypatch.setattr(boat2mmvit, 'BOATSwin', lambda arch, **kw: _swin(**kw))
    monkeypatch.setattr(refiner2mmvit, 'RefinerViT',
                        lambda arch, **kw: RefinerViT(**{**REFINER_TINY, **kw}))


def test_boat2mmvit_converts_ema_only_and_trusted_checkpoints(tmp_path, tiny_converters, capsys):
    public = _public_swin()
    src = _save_to(tmp_path / 'tiny.pth.tar',
                {'state_dict_ema': {f'module.{k}': v for k, v in public.items()}})
    dst = tmp_path / 'checkpoints' / 'boat-swin-t_mmvit.pth'
    digest = boat2mmvit.main([src, str(dst), '--model', 'swin'])
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert f'{digest}  {dst}' in capsys.readouterr().out
    converted = load_checkpoint_file(dst)['state_dict']
    model = _swin(init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    assert model.load_report.ok and 'head.weight' not in converted
    torch.testing.assert_close(converted['stages.0.blocks.1.fsla.qkv.weight'],
                               public['layers.0.blocks.1.attnC.qkv.weight'])

    custom = _save_to(tmp_path / 'custom.pth', {'model': public, 'config': Custom(1)})
    with pytest.raises(UnsafeCheckpointError, match='Custom'):
        boat2mmvit.main([custom, str(dst), '--model', 'swin'])
    dst.unlink()
    digest = boat2mmvit.main([custom, str(dst), '--model', 'swin', '--trust-checkpoint'])
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    trusted = load_checkpoint_file(dst)['state_dict']
    assert trusted.keys() == converted.keys()
    assert all(torch.equal(trusted[k], v) for k, v in converted.items())


def test_converters_name_the_family_of_a_wrong_checkpoint(tmp_path, tiny_converters):
    src = _save_to(tmp_path / 'refiner.pth', {'model': public_state_dict(48, 4, 4, 2.)})
    with pytest.raises(ValueError, match=r'does not fit BOATSwin.*looks like Refiner-ViT, public'):
        boat2mmvit.main([src, str(tmp_path / 'out.pth'), '--model', 'swin'])
    src = _save_to(tmp_path / 'swin.pth', {'model': _public_swin()})
    with pytest.raises(ValueError, match=r'does not fit RefinerViT.*looks like BOAT-Swin, public'):
        refiner2mmvit.main([src, str(tmp_path / 'out.pth')])
    assert not (tmp_path / 'out.pth').exists()


def test_refiner2mmvit_converts_ema_only_checkpoints(tmp_path, tiny_converters, capsys):
    public = public_state_dict(48, 4, 4, 2.)
    src = _save_to(tmp_path / 'refiner.pth.tar', {'state_dict_ema': public})
    dst = tmp_path / 'refiner-vit-s_mmvit.pth'
    digest = refiner2mmvit.main([src, str(dst)])
    assert f'{digest}  {dst}' in capsys.readouterr().out
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    model = RefinerViT(**REFINER_TINY, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    assert model.load_report.ok, model.load_report.format()


# -- tools/train.py and tools/test.py on the toy data ------------------------------------------
train_tool = load_tool('tools/train.py')
test_tool = load_tool('tools/test.py')


@pytest.fixture(scope='module')
def toy_config(tmp_path_factory):
    """A tiny MAFormer UperNet on the toy ADE20K set, 1 iteration, no validation."""
    base = tmp_path_factory.mktemp('safety')
    toy = load_tool('tools/misc/make_toy_dataset.py')
    root = toy.make_seg_toy(str(base / 'ade'), num_train=2, num_val=1, size=64)
    cfg = Config.fromfile(str(ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'))
    toy.toy_overrides(cfg, 'seg', str(root), 64)
    cfg.model.backbone.update(arch=TINY_BACKBONES['MAFormer']['arch'], init_cfg=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16)
    cfg.model.auxiliary_head.update(in_channels=64, channels=8)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=100)
    cfg.train_dataloader.batch_size = 2  # BN (SyncBN on CPU) needs > 1 value per channel
    cfg.param_scheduler = [dict(type='PolyLR', power=1.0, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=1)
    cfg.default_hooks.logger.interval = 1
    return base, cfg


def _config(toy_config, tag: str) -> str:
    """The toy config under its own name: each Runner gets its own experiment name."""
    base, cfg = toy_config
    path = base / f'toy_{tag}.py'
    cfg.dump(str(path))
    return str(path)


@pytest.fixture(scope='module')
def trained(toy_config):
    """A training checkpoint written by mmengine's Runner (1 iteration)."""
    base, _ = toy_config
    work_dir = base / 'trained'
    train_tool.main([_config(toy_config, 'trained'), '--work-dir', str(work_dir)])
    return work_dir


@pytest.fixture
def schemes_restored():
    before = dict(CheckpointLoader._schemes)
    yield
    assert CheckpointLoader._schemes == before


def _runner_checkpoint_with(trained, path, **extra) -> str:
    """The Runner's checkpoint with more entries (objects the safe loader refuses)."""
    return _save_to(path, {**load_checkpoint_file(trained / 'iter_1.pth'), **extra})


def _log(work_dir) -> str:
    return '\n'.join(p.read_text() for p in work_dir.rglob('*.log'))


def test_train_resumes_a_runner_checkpoint_without_trust(toy_config, trained, schemes_restored):
    checkpoint = load_checkpoint_file(trained / 'iter_1.pth')  # what mmengine's Runner wrote
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= set(
        checkpoint)
    train_tool.main([_config(toy_config, 'resume'), '--work-dir', str(trained), '--resume',
                     '--cfg-options', 'train_cfg.max_iters=2'])
    assert 'resumed epoch: 0, iter: 1' in _log(trained)
    assert load_checkpoint_file(trained / 'iter_2.pth')['meta']['iter'] == 2


def test_train_refuses_malicious_resume_and_load_from(toy_config, trained, tmp_path,
                                                      schemes_restored):
    marker = tmp_path / 'MARKER'
    evil = _runner_checkpoint_with(trained, tmp_path / 'evil.pth', x=Payload(marker))
    config = _config(toy_config, 'evil')
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        train_tool.main([config, '--work-dir', str(tmp_path / 'w1'), '--resume', evil])
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        train_tool.main([config, '--work-dir', str(tmp_path / 'w2'),
                         '--cfg-options', f'load_from={evil}'])
    assert not marker.exists()


def test_train_loads_a_trusted_checkpoint_only_with_the_flag(toy_config, trained, tmp_path,
                                                             schemes_restored):
    custom = _runner_checkpoint_with(trained, tmp_path / 'custom.pth', extra=Custom(1))
    config = _config(toy_config, 'custom')
    with pytest.raises(UnsafeCheckpointError, match='Custom'):
        train_tool.main([config, '--work-dir', str(tmp_path / 'w1'),
                         '--cfg-options', f'load_from={custom}'])
    work_dir = tmp_path / 'w2'
    train_tool.main([_config(toy_config, 'trusted'), '--work-dir', str(work_dir),
                     '--trust-checkpoint', '--cfg-options', f'load_from={custom}'])
    assert 'Load checkpoint from' in _log(work_dir) and (work_dir / 'iter_1.pth').is_file()


def test_test_tool_is_safe_by_default_and_trusts_on_request(toy_config, trained, tmp_path,
                                                            schemes_restored):
    marker = tmp_path / 'MARKER'
    evil = _runner_checkpoint_with(trained, tmp_path / 'evil.pth', x=Payload(marker))
    config = _config(toy_config, 'test')
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        test_tool.main([config, evil, '--work-dir', str(tmp_path / 't1')])
    assert not marker.exists()

    test_tool.main([config, str(trained / 'iter_1.pth'), '--work-dir', str(tmp_path / 't2')])
    assert 'mIoU' in _log(tmp_path / 't2')

    custom = _runner_checkpoint_with(trained, tmp_path / 'custom.pth', extra=Custom(1))
    with pytest.raises(UnsafeCheckpointError, match='Custom'):
        test_tool.main([_config(toy_config, 'test2'), custom, '--work-dir', str(tmp_path / 't3')])
    test_tool.main([_config(toy_config, 'test3'), custom, '--trust-checkpoint',
                    '--work-dir', str(tmp_path / 't4')])
    assert 'mIoU' in _log(tmp_path / 't4')


def test_image_demo_is_safe_by_default_and_trusts_on_request(toy_config, trained, tmp_path,
                                                             schemes_restored):
    demo = load_tool('tools/misc/image_demo.py')
    image = next((toy_config[0] / 'ade' / 'images' / 'validation').iterdir())
    config = _config(toy_config, 'demo')
    marker = tmp_path / 'MARKER'
    evil = _runner_checkpoint_with(trained, tmp_path / 'evil.pth', x=Payload(marker))
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        demo.main([str(image), config, evil, '--out-file', str(tmp_path / 'evil.png')])
    assert not marker.exists() and not (tmp_path / 'evil.png').exists()

    custom = _runner_checkpoint_with(trained, tmp_path / 'custom.pth', extra=Custom(1))
    with pytest.raises(UnsafeCheckpointError, match='Custom'):
        demo.main([str(image), config, custom, '--out-file', str(tmp_path / 'custom.png')])
    out = demo.main([str(image), config, custom, '--trust-checkpoint',
                     '--out-file', str(tmp_path / 'custom.png')])
    assert os.path.isfile(out)
