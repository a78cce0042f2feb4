"""Shared fixtures: tiny configurations of every backbone, for fast tests."""
import pytest
import torch

# The smallest sensible configuration of each registered backbone; tests that run every
# backbone (registry, mm model integration) use these. Every exported backbone must be here.
TINY_BACKBONES = {
    'RefinerViT': dict(arch=dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2.),
                       window_size=4, global_attn_indexes=(2, 3)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
