"""Reading public checkpoint layouts and reporting what does not match."""
import pytest
import torch
from mmengine.logging import MMLogger
from torch import nn

from mmvit_plugins.utils.checkpoint import (
    extract_state_dict,
    load_checkpoint_file,
    load_state_dict_report,
)


def _weights():
    return {'fc.weight': torch.ones(2, 3), 'fc.bias': torch.zeros(2)}


@pytest.mark.parametrize('layout', [
    lambda w: w,
    lambda w: {'model': w},
    lambda w: {'state_dict': w, 'epoch': 3},
    lambda w: {'state_dict': {'module.' + k: v for k, v in w.items()}},
    lambda w: {'state_dict': {'backbone.' + k: v for k, v in w.items()}},
])
def test_extract_state_dict_layouts(layout):
    state = extract_state_dict(layout(_weights()))
    assert list(state) == ['fc.weight', 'fc.bias']


def test_extract_state_dict_prefers_ema_only_when_asked():
    ckpt = {'state_dict': _weights(), 'state_dict_ema': {'fc.weight': torch.full((2, 3), 7.)}}
    assert extract_state_dict(ckpt)['fc.weight'].max() == 1
    assert extract_state_dict(ckpt, use_ema=True)['fc.weight'].max() == 7


def test_extract_state_dict_rejects_non_checkpoints():
    with pytest.raises(ValueError, match='holds no state dict'):
        extract_state_dict({'epoch': 3, 'meta': {}})
    with pytest.raises(TypeError, match='must be a dict'):
        extract_state_dict([1, 2])


def test_load_checkpoint_file_reads_full_training_checkpoints(tmp_path):
    import numpy as np
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': _weights(), 'meta': {'np': np.float64(1.5)}}, path)
    assert extract_state_dict(load_checkpoint_file(str(path)))['fc.bias'].shape == (2, )
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_checkpoint_file(str(tmp_path / 'missing.pth'))


def test_load_report_names_every_unmatched_key(capsys):
    model = nn.Sequential()
    model.add_module('fc', nn.Linear(3, 2))
    model.add_module('out_norm0', nn.LayerNorm(2))
    model.add_module('head', nn.Linear(2, 4))
    state = {'fc.weight': torch.full((2, 3), 5.), 'fc.bias': torch.zeros(2),
             'head.weight': torch.zeros(5, 2), 'extra.weight': torch.zeros(1)}
    logger = MMLogger.get_instance('test_load_report')
    report = load_state_dict_report(model, state, ignore_missing=('out_norm', ), logger=logger)
    assert torch.equal(model.fc.weight, torch.full((2, 3), 5.))
    assert report.unexpected == ['extra.weight']
    assert report.missing == ['head.bias']
    assert report.mismatched == ['head.weight: checkpoint (5, 2) vs model (4, 2)']
    assert not report.ok
    logged = capsys.readouterr().out
    assert 'head.weight: checkpoint (5, 2)' in logged and 'extra.weight' in logged
