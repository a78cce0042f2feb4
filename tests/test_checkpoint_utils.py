"""mmvit_plugins.checkpoint: the safe loader (allow-list, refusals, bad files), every public
layout, URL forms through mmengine's schemes, and the report of what does not match."""
import argparse
import io
import logging
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MMLogger
from mmengine.runner import checkpoint as mm_checkpoint
from torch import nn

from mmvit_plugins.checkpoint import (
    KeyLayout,
    UnsafeCheckpointError,
    describe_keys,
    extract_state_dict,
    key_family,
    key_layouts,
    load_checkpoint_file,
    load_state_dict_report,
    other_family,
    register_key_layouts,
    safe_mmengine_loading,
)
from mmvit_plugins.models.backbones import BOATCSWin, BOATSwin, MAFormer, RefinerViT

from .conftest import TINY_BACKBONES
from .test_boat import _fake_public_checkpoint, _public_cswin_keys, _public_swin_keys
from .test_refiner_vit import public_state_dict


def _weights():
    return {'fc.weight': torch.ones(2, 3), 'fc.bias': torch.zeros(2)}


class Custom:
    """A class of the user's own: only a trusted load may build it."""

    def __init__(self, value):
        self.value = value


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


class StealAttribute:
    """Unpickles to ``getattr(np.ndarray, 'tofile')``: the restricted getattr must refuse it."""

    def __reduce__(self):
        return getattr, (np.ndarray, 'tofile')


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logged():
    """A fresh current MMLogger whose records are collected."""
    logger = MMLogger.get_instance(f'ckpt-test-{os.urandom(4).hex()}')
    handler = Records()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def _messages(records, level=None):
    return ' | '.join(r.getMessage() for r in records if level is None or r.levelno == level)


# -- layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize('layout', [
    lambda w: w,
    lambda w: {'model': w},
    lambda w: {'state_dict': w, 'epoch': 3},
    lambda w: {'module': w},
    lambda w: {'state_dict': {'module.' + k: v for k, v in w.items()}},
    lambda w: {'state_dict': {'backbone.' + k: v for k, v in w.items()}},
    lambda w: {'state_dict': {'module.backbone.' + k: v for k, v in w.items()}},
    lambda w: {'state_dict_ema': w, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)},
], ids=['bare', 'model', 'state_dict', 'module', 'module.', 'backbone.', 'module.backbone.',
        'ema_only'])
def test_extract_state_dict_layouts(layout, tmp_path):
    path = tmp_path / 'layout.pth'
    torch.save(layout(_weights()), path)
    state = extract_state_dict(load_checkpoint_file(path))
    assert list(state) == ['fc.weight', 'fc.bias']


def test_full_model_checkpoint_gives_its_backbone(logged):
    ckpt = {'state_dict': {**{'backbone.' + k: v for k, v in _weights().items()},
                           'neck.weight': torch.zeros(1), 'decode_head.bias': torch.zeros(1)}}
    assert list(extract_state_dict(ckpt)) == ['fc.weight', 'fc.bias']
    assert "left out 2 others" in _messages(logged)
    assert list(extract_state_dict(ckpt, prefix='neck')) == ['weight']
    with pytest.raises(ValueError, match=r"'full.pth' has no key under prefix='encoder'"):
        extract_state_dict(ckpt, prefix='encoder', name='full.pth')


def test_ema_weights_are_taken_when_asked_or_alone(logged):
    ema = {'fc.weight': torch.full((2, 3), 7.), 'fc.bias': torch.ones(2)}
    both = {'state_dict': _weights(), 'state_dict_ema': ema}
    assert extract_state_dict(both, name='both.pth.tar')['fc.weight'].max() == 1
    assert not logged
    assert extract_state_dict(both, use_ema=True, name='both.pth.tar')['fc.weight'].max() == 7
    assert "using the EMA weights 'state_dict_ema' (use_ema=True)" in _messages(logged)
    only = extract_state_dict({'state_dict_ema': ema}, name='ema.pth.tar')
    assert only['fc.weight'].max() == 7
    assert "ema.pth.tar: using the EMA weights 'state_dict_ema' (the checkpoint holds no other" \
        in _messages(logged, logging.INFO)
    deit = {'model': _weights(), 'model_ema': ema}
    assert extract_state_dict(deit, use_ema=True)['fc.weight'].max() == 7
    extract_state_dict({'model': _weights()}, use_ema=True, name='raw.pth')
    assert "raw.pth: use_ema=True but the checkpoint has no 'state_dict_ema'" in _messages(
        logged, logging.WARNING)


def test_extract_state_dict_rejects_non_checkpoints():
    with pytest.raises(ValueError, match=r"'x.pth' holds no state dict.*found keys \['epoch'"):
        extract_state_dict({'epoch': 3, 'meta': {}}, name='x.pth')
    with pytest.raises(TypeError, match="'x.pth' must hold a dict, got list"):
        extract_state_dict([1, 2], name='x.pth')


def test_non_finite_tensors_are_refused_by_name():
    state = {'a': torch.ones(2), 'b': torch.tensor([1., float('nan')]),
             'c': torch.tensor([float('inf')]), 'index': torch.arange(3)}
    with pytest.raises(ValueError, match=r"'nan.pth' holds NaN or infinite values in 2 "
                                         r'tensor\(s\): b, c; refusing'):
        extract_state_dict({'state_dict': state}, name='nan.pth')


# -- the safe loader -----------------------------------------------------------------------
def test_training_checkpoint_contents_load_safely_and_torch_state_is_restored(tmp_path):
    buffer = HistoryBuffer()
    buffer.update(0.5)
    ckpt = {'state_dict': _weights(), 'args': argparse.Namespace(lr=1e-3, sched='cosine'),
            'meta': {'np_float': np.float64(1.5), 'np_int': np.int64(3), 'seed': 7,
                     'array': np.arange(4, dtype=np.float32), 'dtype': np.dtype('float16'),
                     'objects': np.array([1, 'a'], dtype=object), 'classes': {'a', 'b'},
                     'data': b'\x00\xff', 'frozen': frozenset([1])},
            'message_hub': {'log_scalars': {'train/loss': buffer}}, 'ordered': OrderedDict(a=1)}
    path = tmp_path / 'full.pth'
    torch.save(ckpt, path)
    serialization = torch.serialization
    serialization.add_safe_globals([Custom])  # the user's own allow-list entry
    try:
        loaded = load_checkpoint_file(path)
        assert serialization.get_safe_globals() == [Custom]
    finally:
        serialization.clear_safe_globals()
    meta = loaded['meta']
    assert loaded['args'].sched == 'cosine' and meta['np_float'] == 1.5
    assert meta['array'].dtype == np.float32 and meta['array'][3] == 3
    assert meta['dtype'] == np.float16 and meta['objects'][1] == 'a'
    assert meta['classes'] == {'a', 'b'} and meta['data'] == b'\x00\xff'
    assert loaded['message_hub']['log_scalars']['train/loss'].mean() == 0.5
    assert extract_state_dict(loaded)['fc.bias'].shape == (2, )


def test_numpy_1_module_paths_load(tmp_path):
    """A checkpoint written under numpy 1.x names numpy.core.multiarray (numpy 2: _core)."""
    buffer = io.BytesIO()
    torch.save({'state_dict': _weights(), 'best': np.float32(0.25), 'a': np.arange(2)}, buffer,
               _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    for module in (b'numpy._core.multiarray', b'numpy.core.multiarray'):
        data = data.replace(module + b'\n', b'numpy.core.multiarray\n')
    assert b'numpy.core.multiarray\nscalar' in data and b'numpy._core' not in data
    path = tmp_path / 'numpy1.pth'
    path.write_bytes(data)
    loaded = load_checkpoint_file(path)
    assert loaded['best'] == np.float32(0.25) and list(loaded['a']) == [0, 1]


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': _weights(), 'x': Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    message = str(error.value)
    assert f"checkpoint '{path}' was refused by the safe loader" in message
    assert f'it needs {os.system.__module__}.system' in message
    assert 'trust_checkpoint=True' in message and '--trust-checkpoint' in message
    assert not marker.exists()


def test_user_classes_need_trust(tmp_path):
    path = tmp_path / 'custom.pth'
    torch.save({'state_dict': _weights(), 'extra': Custom(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f'it needs {__name__}.Custom'):
        load_checkpoint_file(path)
    assert load_checkpoint_file(path, trust=True)['extra'].value == 3


def test_only_history_buffer_statistics_are_reachable_through_getattr(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'x': StealAttribute()}, path)
    with pytest.raises(UnsafeCheckpointError,
                       match=r"needs builtins.getattr\(ndarray,'tofile'\)"):
        load_checkpoint_file(path)


def _truncated_zip(path):
    full = io.BytesIO()
    torch.save(_weights(), full)
    path.write_bytes(full.getvalue()[:300])


def _other_zip(path):
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('weights.npy', b'123')


def _truncated_legacy(path):
    full = io.BytesIO()
    torch.save(_weights(), full, _use_new_zipfile_serialization=False)
    path.write_bytes(full.getvalue()[:40])


@pytest.mark.parametrize('make, error, match', [
    (lambda p: p.write_bytes(b''), ValueError, r"'{}' is empty \(0 bytes\)"),
    (_truncated_zip, ValueError,
     r"'{}' cannot be read: it is an incomplete or corrupt zip archive \(a truncated download"),
    (_truncated_legacy, ValueError, r"'{}' cannot be read: it is an incomplete or corrupt pickle"),
    (_other_zip, ValueError, r"'{}' cannot be read: it is a zip archive that torch.save did not"),
    (lambda p: p.write_text('epoch: 3\nlr: 0.1\n'), ValueError,
     r"'{}' is not a PyTorch checkpoint: it is a text file \(it starts with 'epoch: 3"),
    (lambda p: p.write_text('<!DOCTYPE html><html>Sign in</html>'), ValueError,
     r"'{}' is not a PyTorch checkpoint: it is an HTML page \(a failed download\?\)"),
    (lambda p: p.write_bytes(pickle.dumps({'a': 1}, protocol=4)), ValueError,
     r"'{}' cannot be read: it is an incomplete or corrupt pickle \(truncated\?\), or not "
     r'written by torch.save'),
    (lambda p: p.mkdir(), IsADirectoryError, r"'{}' is a directory, not a file"),
    (lambda p: None, FileNotFoundError, r"checkpoint file not found: '{}'"),
], ids=['empty', 'truncated_zip', 'truncated_legacy', 'other_zip', 'text', 'html', 'pickle',
        'directory', 'missing'])
def test_bad_files_are_named_with_the_cause(tmp_path, make, error, match):
    path = tmp_path / 'bad.pth'
    make(path)
    with pytest.raises(error, match=match.format(path)):
        load_checkpoint_file(str(path))


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / 'locked.pth'
    torch.save(_weights(), path)
    path.chmod(0)
    real_open = open

    def deny(file, *args, **kwargs):  # root reads mode-0 files: deny as a normal user's OS would
        if str(file) == str(path):
            raise PermissionError(13, 'Permission denied', str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr('builtins.open', deny)
    with pytest.raises(PermissionError, match=f"'{path}' cannot be read: permission denied"):
        load_checkpoint_file(path)


# -- URL forms, through mmengine's schemes, never downloading ---------------------------------
@pytest.fixture
def fake_downloads(tmp_path, monkeypatch):
    """torch.hub downloads copy files from ``served`` (URL -> local file) into a temp hub dir."""
    served = {}

    def download(url, dst, hash_prefix=None, progress=True):
        shutil.copy(served[url], dst)
        downloads.append(url)

    downloads = []
    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    return served, downloads


def test_urls_and_model_zoo_names_load_through_the_safe_loader(tmp_path, monkeypatch,
                                                               fake_downloads):
    served, downloads = fake_downloads
    good, evil = tmp_path / 'good.pth', tmp_path / 'evil.pth'
    torch.save({'state_dict': _weights()}, good)
    marker = tmp_path / 'MARKER'
    torch.save({'state_dict': _weights(), 'x': Payload(marker)}, evil)
    served.update({'https://host/w/good-1234.pth': good, 'http://host/w/evil.pth': evil})
    monkeypatch.setattr(mm_checkpoint, 'get_torchvision_models',
                        lambda: {'resnet50': 'https://host/w/good-1234.pth'})
    (tmp_path / 'home').mkdir()
    shutil.copy(good, tmp_path / 'home' / 'local.pth')
    monkeypatch.setattr(mm_checkpoint, '_get_mmengine_home', lambda: str(tmp_path / 'home'))
    monkeypatch.setattr(mm_checkpoint, 'get_external_models',
                        lambda: {'resnet50_v1c': 'http://host/w/evil.pth', 'local': 'local.pth'})
    for name in ('https://host/w/good-1234.pth', 'torchvision://resnet50',
                 'modelzoo://resnet50', 'open-mmlab://local', 'openmmlab://local'):
        assert list(extract_state_dict(load_checkpoint_file(name))) == ['fc.weight', 'fc.bias']
    assert downloads == ['https://host/w/good-1234.pth']  # cached after the first
    for name in ('http://host/w/evil.pth', 'open-mmlab://resnet50_v1c'):
        with pytest.raises(UnsafeCheckpointError, match=r'http://host/w/evil.pth \(cached as '):
            load_checkpoint_file(name)
    with pytest.raises(ValueError, match=r"torchvision://vgg: unknown model name; known names "
                                         r"include \['resnet50'\]"):
        load_checkpoint_file('torchvision://vgg')
    assert not marker.exists()


def test_ceph_bytes_go_through_the_safe_loader(tmp_path, monkeypatch):
    marker = tmp_path / 'MARKER'
    evil = io.BytesIO()
    torch.save({'x': Payload(marker)}, evil)

    class Backend:
        def get(self, filename):
            return evil.getvalue()

    monkeypatch.setattr('mmengine.fileio.get_file_backend', lambda *a, **k: Backend())
    with pytest.raises(UnsafeCheckpointError, match="'s3://bucket/evil.pth' was refused"):
        load_checkpoint_file('s3://bucket/evil.pth')
    assert not marker.exists()


def test_safe_mmengine_loading_routes_every_scheme_and_restores_them(tmp_path, fake_downloads):
    served, _ = fake_downloads
    marker = tmp_path / 'MARKER'
    evil, custom = tmp_path / 'evil.pth', tmp_path / 'custom.pth'
    torch.save({'state_dict': _weights(), 'x': Payload(marker)}, evil)
    torch.save({'state_dict': _weights(), 'extra': Custom(1)}, custom)
    served['https://host/evil.pth'] = evil
    loader = mm_checkpoint.CheckpointLoader
    before = dict(loader._schemes)
    with safe_mmengine_loading(trusted=[str(custom), None]):
        for name in (str(evil), 'https://host/evil.pth'):
            with pytest.raises(UnsafeCheckpointError):
                mm_checkpoint._load_checkpoint(name, map_location='cpu')
        assert mm_checkpoint._load_checkpoint(str(custom))['extra'].value == 1
        assert set(before) <= set(loader._schemes)
        assert all(loader._schemes[p].__name__ == 'load_from_mmvit_safe' for p in before)
    assert loader._schemes == before
    assert not marker.exists()


# -- which checkpoint is it ------------------------------------------------------------------
def _tiny(name, **kwargs):
    return {'BOATSwin': BOATSwin, 'BOATCSWin': BOATCSWin, 'RefinerViT': RefinerViT,
            'MAFormer': MAFormer}[name](**{**TINY_BACKBONES[name], **kwargs})


def _public(name):
    model = _tiny(name)
    depths = TINY_BACKBONES[name]['arch'].get('depths')
    if name == 'BOATSwin':
        return _fake_public_checkpoint(model, _public_swin_keys(depths))
    if name == 'BOATCSWin':
        return _fake_public_checkpoint(model, _public_cswin_keys(depths))
    return public_state_dict(48, 4, 4, 2.)


@pytest.mark.parametrize('name, public, converted', [
    ('BOATSwin', 'BOAT-Swin, public layout (embed_dims 8, depths (2, 2, 2, 1))',
     'BOAT-Swin, converted layout (embed_dims 8, depths (2, 2, 2, 1))'),
    ('BOATCSWin', 'BOAT-CSWin, public layout (embed_dims 8, depths (1, 1, 1, 1))',
     'BOAT-CSWin, converted layout (embed_dims 8, depths (1, 1, 1, 1))'),
    ('RefinerViT', 'Refiner-ViT, public layout (embed_dims 48, 4 blocks)',
     'Refiner-ViT, converted layout (embed_dims 32, 4 blocks)'),
    ('MAFormer', None, 'MAFormer (embed_dims 16, depths (1, 1, 1, 1))'),
])
def test_describe_keys_names_family_layout_and_size(name, public, converted):
    if public:
        assert describe_keys(_public(name)) == public
    assert describe_keys(_tiny(name).state_dict()) == converted
    assert describe_keys({'conv1.weight': torch.zeros(1)}).startswith(
        'none of BOAT-Swin, BOAT-CSWin, Refiner-ViT or MAFormer (its first keys: conv1.weight')


@pytest.mark.parametrize('name', list(TINY_BACKBONES))
def test_every_backbone_declares_the_layouts_its_checkpoints_are_told_apart_by(name):
    """A backbone's own ``checkpoint_layouts`` are registered and name its state dict; the
    state dict of every other backbone is another family, refused by the one check."""
    model = _tiny(name)
    assert model.checkpoint_layouts
    assert set(model.checkpoint_layouts) <= set(key_layouts._LAYOUTS)
    family = key_family(model.state_dict())
    assert family == model.checkpoint_layouts[0].family
    for other in TINY_BACKBONES:
        other_state = _tiny(other).state_dict()
        if other == name:
            assert other_family(other_state, model.state_dict()) is None
        else:
            assert other_family(other_state, model.state_dict()) == (key_family(other_state),
                                                                     family)


def test_a_registered_layout_is_recognised_and_named(monkeypatch):
    """What a new backbone's file adds is all that detection needs."""
    monkeypatch.setattr(key_layouts, '_LAYOUTS', list(key_layouts._LAYOUTS))
    layout = KeyLayout('New-Net, public layout', r'^trunk\.\d+\.mixer\.',
                       r'^trunk\.(\d+)\.', 'stem.weight')
    state = {'stem.weight': torch.zeros(24, 3), 'trunk.0.mixer.w': torch.zeros(1),
             'trunk.1.mixer.w': torch.zeros(1)}
    assert key_family(state) is None
    with pytest.raises(TypeError, match='KeyLayout'):
        register_key_layouts([('New-Net', r'^trunk\.', r'^trunk\.(\d+)\.', 'stem.weight')])
    register_key_layouts([layout, layout])
    assert key_layouts._LAYOUTS.count(layout) == 1
    assert key_family(state) == 'New-Net'
    assert describe_keys(state) == 'New-Net, public layout (embed_dims 24, 2 blocks)'
    assert describe_keys({'conv1.weight': torch.zeros(1)}).startswith(
        'none of BOAT-Swin, BOAT-CSWin, Refiner-ViT, MAFormer or New-Net (its first keys')
    assert other_family(state, _tiny('MAFormer').state_dict()) == ('New-Net', 'MAFormer')


# -- the report ------------------------------------------------------------------------------
def test_load_report_names_every_unmatched_key(logged):
    model = nn.Sequential()
    model.add_module('fc', nn.Linear(3, 2))
    model.add_module('out_norm0', nn.LayerNorm(2))
    model.add_module('head', nn.Linear(2, 4))
    state = {'fc.weight': torch.full((2, 3), 5.), 'fc.bias': torch.zeros(2),
             'head.weight': torch.zeros(5, 2), 'extra.weight': torch.zeros(1)}
    report = load_state_dict_report(model, state, ignore_missing=('out_norm', ))
    assert torch.equal(model.fc.weight, torch.full((2, 3), 5.))
    assert report.unexpected == ['extra.weight']
    assert report.missing == ['head.bias']
    assert report.mismatched == ['head.weight: checkpoint (5, 2) vs model (4, 2)']
    assert (report.loaded, report.total) == (2, 6) and not report.ok
    warned = _messages(logged, logging.WARNING)
    assert 'head.weight: checkpoint (5, 2)' in warned and 'extra.weight' in warned
    load_state_dict_report(model, model.state_dict())
    assert 'Sequential: loaded 6/6 tensors from state dict; all keys matched' in _messages(
        logged, logging.INFO)


def test_keys_public_checkpoints_lack_are_matched_by_prefix(logged):
    """``ignore_missing`` holds key prefixes, the rule the timm models apply too: a key that
    holds one further in is still reported missing."""
    model = nn.Sequential()
    model.add_module('out_norm0', nn.LayerNorm(2))
    model.add_module('mix', nn.ModuleDict({'out_norm': nn.LayerNorm(2)}))
    report = load_state_dict_report(model, {}, ignore_missing=('out_norm', ))
    assert report.missing == ['mix.out_norm.weight', 'mix.out_norm.bias']


def test_torch_without_an_extensible_allow_list_loads_plain_files_only(tmp_path, monkeypatch):
    """torch 1.13-2.3: weights_only=True without add_safe_globals (simulated)."""
    from mmvit_plugins.checkpoint import safe_load
    monkeypatch.setattr(safe_load, '_TORCH_HAS_SAFE_GLOBALS', False)
    plain = _save_to(tmp_path / 'plain.pth', {'state_dict': _weights(), 'epoch': 3})
    assert list(extract_state_dict(load_checkpoint_file(plain))) == ['fc.weight', 'fc.bias']
    numpy = _save_to(tmp_path / 'numpy.pth', {'state_dict': _weights(), 'best': np.float64(1.)})
    with pytest.raises(UnsafeCheckpointError, match=r'cannot extend its allow-list; with torch '
                                                     r'>= 2.4 numpy values'):
        load_checkpoint_file(numpy)
    assert load_checkpoint_file(numpy, trust=True)['best'] == 1.


def test_torch_without_weights_only_loads_trusted_files_only(tmp_path, monkeypatch):
    """torch < 1.13 has no safe loader (simulated)."""
    from mmvit_plugins.checkpoint import safe_load
    monkeypatch.setattr(safe_load, '_TORCH_HAS_WEIGHTS_ONLY', False)
    plain = _save_to(tmp_path / 'plain.pth', {'state_dict': _weights()})
    with pytest.raises(UnsafeCheckpointError, match=r"'.*plain.pth' was not loaded: torch .* has "
                                                     r'no safe loader .*needs torch >= 1.13'):
        load_checkpoint_file(plain)
    assert list(load_checkpoint_file(plain, trust=True)) == ['state_dict']


def _save_to(path, obj):
    torch.save(obj, path)
    return str(path)
