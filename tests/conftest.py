"""Shared fixtures: tiny configurations of every backbone, for fast tests."""
import pytest
import torch

# The smallest sensible configuration of each registered backbone; tests that run every
# backbone (registry, mm model integration) use these. Every exported backbone must be here.
TINY_BACKBONES = {
    'BOATSwin': dict(arch=dict(embed_dims=8, depths=(2, 2, 2, 1), num_heads=(1, 1, 2, 2))),
    'BOATCSWin': dict(arch=dict(embed_dims=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                                split_sizes=(1, 2, 7, 7))),
    'RefinerViT': dict(arch=dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2.),
                       window_size=4, global_attn_indexes=(2, 3)),
    'MAFormer': dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
                     pretrain_img_size=64),
}

# The devices of the device-parametrised tests (parity with the references, graph capture):
# the CPU always, CUDA where there is one, so that a GPU machine runs the same assertions.
DEVICES = ('cpu', 'cuda') if torch.cuda.is_available() else ('cpu', )


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
