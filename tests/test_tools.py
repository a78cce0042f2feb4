"""tools/analysis/get_flops.py, tools/analysis/benchmark.py, tools/misc/browse_dataset.py and
tools/misc/demo.py on small inputs."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info

from .helpers import ROOT, load_tool

SEG_CONFIG = ROOT / 'configs' / 'upernet_maformer_s_ade20k.py'
DET_CONFIG = ROOT / 'configs' / 'mask_rcnn_maformer_s_fpn_1x_coco.py'
TINY = {'model.backbone.arch': dict(_delete_=True, embed_dims=16, depths=(1, 1, 1, 1),
                                    num_heads=(1, 2, 2, 4)),
        'model.backbone.init_cfg': None}


def _run(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


get_flops = load_tool('tools/analysis/get_flops.py')
benchmark = load_tool('tools/analysis/benchmark.py')
TINY_HEADS = {
    SEG_CONFIG: {'model.decode_head.in_channels': [16, 32, 64, 128],
                 'model.decode_head.channels': 16, 'model.auxiliary_head.in_channels': 64,
                 'model.auxiliary_head.channels': 8},
    DET_CONFIG: {'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 16,
                 'model.rpn_head.in_channels': 16, 'model.rpn_head.feat_channels': 16,
                 'model.roi_head.bbox_roi_extractor.out_channels': 16,
                 'model.roi_head.bbox_head.in_channels': 16,
                 'model.roi_head.mask_roi_extractor.out_channels': 16,
                 'model.roi_head.mask_head.in_channels': 16},
}


def test_get_flops_seg_model():
    cfg_options = dict(TINY, **{'model.decode_head.in_channels': [16, 32, 64, 128],
                                'model.auxiliary_head.in_channels': 64})
    module, make_inputs = get_flops.build_forward(str(SEG_CONFIG), (64, 96), 'model', cfg_options)
    with torch.no_grad():
        logits = module(make_inputs(1))
        info = get_model_complexity_info(module, inputs=(make_inputs(1), ), show_table=False,
                                         show_arch=False)
    assert logits.shape[0] == 1 and logits.shape[1] == 150
    assert info['flops'] > 0


def test_get_flops_det_model_and_backbone():
    cfg_options = dict(TINY, **{'model.neck.in_channels': [16, 32, 64, 128]})
    module, make_inputs = get_flops.build_forward(str(DET_CONFIG), (64, 64), 'model', cfg_options)
    with torch.no_grad():
        info = get_model_complexity_info(module, inputs=(make_inputs(1), ), show_table=False,
                                         show_arch=False)
    assert info['flops'] > 0
    backbone, make_inputs = get_flops.build_forward(str(DET_CONFIG), (64, 64), 'backbone',
                                                    cfg_options)
    with torch.no_grad():
        small = get_model_complexity_info(backbone, inputs=(make_inputs(1), ),
                                          show_table=False, show_arch=False)
    assert 0 < small['flops'] < info['flops']
    # the backbone's convolutions and linear layers, counted from their outputs by hooks
    counted = []

    def hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_output = module.in_features
        counted.append(out.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in backbone.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    x = make_inputs(1)
    with torch.no_grad():
        backbone(x)
    for handle in handles:
        handle.remove()
    analyzer = FlopAnalyzer(backbone, (x, ))
    by_operator = analyzer.by_operator()
    assert by_operator['conv'] + by_operator['linear'] == sum(counted) > 0
    assert get_flops.count_flops(backbone, x) > sum(counted)  # attention products on top


class _ConvLinearAttention(torch.nn.Module):
    """A conv, a linear layer and scaled-dot-product attention, FLOPs countable by hand."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.fc = torch.nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.conv(x)).flatten(2).transpose(1, 2)  # (B, L, 8)
        q, k, v = self.fc(x).view(x.shape[0], -1, 3, 2, 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_count_flops_equals_a_hand_count():
    """Multiply-adds: conv (out pixels x out channels x in channels per group x kernel),
    linear (rows x in x out), attention (heads x L x L x (d_qk + d_v)) on a 9x14 input."""
    module = _ConvLinearAttention().eval()
    x = torch.randn(2, 3, 9, 14)
    pixels = 5 * 7  # stride 2, padding 1
    expected = 2 * (pixels * 8 * 3 * 9 + pixels * 8 * 1 * 25 + pixels * 8 * 12 +
                    2 * pixels * pixels * (2 + 2))
    assert get_flops.count_flops(module, x) == expected


def test_get_flops_rejects_bad_arguments():
    with pytest.raises(ValueError, match='shape'):
        get_flops.parse_shape([0, 64])
    with pytest.raises(ValueError, match='part'):
        get_flops.build_forward(str(SEG_CONFIG), (64, 64), 'neck')


def test_get_flops_and_benchmark_cli():
    out = _run('tools/analysis/get_flops.py', str(SEG_CONFIG), '--part', 'backbone',
               '--shape', '64')
    assert 'params: 2' in out and 'FLOPs:' in out  # MAFormer-S: ~2x M parameters
    out = _run('tools/analysis/benchmark.py', str(SEG_CONFIG), '--part', 'backbone',
               '--shape', '64', '--warmup', '1', '--iters', '1')
    assert 'latency:' in out and 'throughput:' in out and 'peak memory:' in out


@pytest.mark.parametrize('config', [SEG_CONFIG, DET_CONFIG], ids=['mmseg', 'mmdet'])
def test_train_step_updates_every_trained_parameter(config):
    model, step = benchmark.build_train_step(str(config), (64, 64), 2, 'cpu',
                                             dict(TINY, **TINY_HEADS[config]))
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    step()
    changed = [not torch.equal(b, p) for b, p in zip(backbone_before, model.backbone.parameters())]
    assert sum(changed) > 0.9 * len(changed)


def test_synthetic_batches_hold_labels():
    seg = benchmark.synthetic_batch('mmseg', (32, 48), 2, 150)
    assert [tuple(x.shape) for x in seg['inputs']] == [(3, 32, 48)] * 2
    labels = torch.cat([s.gt_sem_seg.data for s in seg['data_samples']])
    assert labels.shape == (2, 32, 48) and 0 <= labels.min() and labels.max() < 150
    det = benchmark.synthetic_batch('mmdet', (32, 48), 2, 80)
    instances = det['data_samples'][0].gt_instances
    assert len(instances) == benchmark.NUM_BOXES and instances.masks.masks.shape[1:] == (32, 48)
    assert benchmark.find_num_classes({'a': [{'b': 1}, {'num_classes': 19}]}) == 19


def test_benchmark_train_cli_and_bad_arguments(tmp_path):
    from mmengine.config import Config
    cfg = Config.fromfile(str(SEG_CONFIG))
    cfg.merge_from_dict(dict(TINY, **TINY_HEADS[SEG_CONFIG]))
    config = tmp_path / 'tiny.py'
    cfg.dump(str(config))
    out = _run('tools/analysis/benchmark.py', str(config), '--train', '--shape', '64',
               '--batch-size', '2', '--warmup', '1', '--iters', '1')
    assert 'mode: train step' in out and 'peak memory:' in out
    proc = subprocess.run([sys.executable, 'tools/analysis/benchmark.py', str(config), '--train',
                           '--part', 'backbone'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and '--part=backbone is not allowed' in proc.stderr


def test_browse_dataset(tmp_path):
    toy = load_tool('tools/misc/make_toy_dataset.py')
    root = toy.make_seg_toy(str(tmp_path / 'ade'), num_train=2, num_val=1, size=64)
    out = _run('tools/misc/browse_dataset.py', str(SEG_CONFIG), '--out-dir', str(tmp_path / 'vis'),
               '--num', '2', '--cfg-options', f'train_dataloader.dataset.data_root={root}')
    assert len([line for line in out.splitlines() if line.endswith('.png')]) == 2
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 2


def test_get_flops_counts_scaled_dot_product_attention():
    class Attend(torch.nn.Module):
        def forward(self, q):
            k = torch.ones(1, 2, 7, 4)
            v = torch.ones(1, 2, 7, 3)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    # q k^T: 2 heads * 5 queries * 7 keys * 4 dims; attn v: 2 * 5 * 7 * 3.
    assert get_flops.count_flops(Attend(), torch.ones(1, 2, 5, 4)) == 2 * 5 * 7 * (4 + 3)
