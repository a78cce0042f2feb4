"""Config handling shared by tools/train.py and tools/test.py."""
import pytest
import torch.distributed as dist
from mmengine.config import Config

from mmvit_plugins.utils.runtime import config_scope, replace_sync_bn, shut_down_distributed


def test_replace_sync_bn_everywhere():
    model = dict(backbone=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
                 decode_head=dict(norm_cfg=dict(type='SyncBN')),
                 auxiliary_head=[dict(norm_cfg=dict(type='SyncBN')),
                                 dict(norm_cfg=dict(type='GN'))])
    assert replace_sync_bn(model) == 3
    assert model['backbone']['norm_cfg'] == dict(type='BN', requires_grad=True)
    assert model['auxiliary_head'][1]['norm_cfg']['type'] == 'GN'


def test_config_scope():
    assert config_scope(Config(dict(default_scope='mmseg'))) == 'mmseg'
    with pytest.raises(ValueError, match="default_scope='mmpretrain'"):
        config_scope(Config(dict(default_scope='mmpretrain')))


def test_shut_down_distributed_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    shut_down_distributed()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    shut_down_distributed()
    assert not dist.is_initialized()
