"""tools/train.py and tools/test.py name every missing dataset folder, annotation file,
pretrained checkpoint and checkpoint to load in one message, before a Runner is built."""
import os
import subprocess
import sys

import pytest
from mmengine.config import Config

from mmvit_plugins.utils.preflight import (
    DATASETS_DOC,
    WEIGHTS_DOC,
    MissingPath,
    MissingPathsError,
    check_paths,
    missing_paths,
)

from .helpers import ROOT, load_tool

SEG_CONFIG = ROOT / 'configs' / 'upernet_boat_cswin_t_ade20k.py'
DET_CONFIG = ROOT / 'configs' / 'mask_rcnn_boat_swin_t_fpn_1x_coco.py'
# Where mmseg's ADE20K and mmdet's COCO base configs and the configs' init_cfg read from.
ADE = 'data/ade/ADEChallengeData2016'
ADE_FOLDERS = ['images/training', 'annotations/training', 'images/validation',
               'annotations/validation']
SEG_WEIGHTS = 'checkpoints/boat-cswin-t_mmvit.pth'

train_tool = load_tool('tools/train.py')
test_tool = load_tool('tools/test.py')


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    """The working directory is an empty folder: no data/, no checkpoints/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_names_missing_dataset_and_weights_before_building_the_runner(in_empty_dir):
    work_dir = in_empty_dir / 'work'
    with pytest.raises(MissingPathsError) as error:
        train_tool.main([str(SEG_CONFIG), '--work-dir', str(work_dir)])
    # The training and validation sets share the missing data_root: one path, both keys.
    roots = ('train_dataloader.dataset.data_root', 'val_dataloader.dataset.data_root')
    assert error.value.missing == [MissingPath(ADE, roots, 'dataset'),
                                   MissingPath(SEG_WEIGHTS, ('model.backbone.init_cfg', ),
                                               'pretrained')]
    message = str(error.value)
    for text in (f'tools/train.py: 2 path(s) the config names do not exist (relative paths are '
                 f'read from {in_empty_dir}):\n  {ADE}  ({roots[0]}, {roots[1]})\n'
                 f'  {SEG_WEIGHTS}  (model.backbone.init_cfg)\n', DATASETS_DOC, WEIGHTS_DOC,
                 f'--cfg-options {roots[0]}=DIR {roots[1]}=DIR',
                 '--cfg-options model.backbone.init_cfg=None', '`make demo`'):
        assert text in message, text
    assert not work_dir.exists()  # no Runner was built


def test_test_names_missing_dataset_and_checkpoint_not_the_pretrained_weights(in_empty_dir):
    with pytest.raises(MissingPathsError) as error:
        test_tool.main([str(DET_CONFIG), 'work/epoch_12.pth', '--work-dir', 'work'])
    # The evaluator's annotation file lies under the missing data_root: not named again.
    assert error.value.missing == [
        MissingPath('data/coco', ('test_dataloader.dataset.data_root', ), 'dataset'),
        MissingPath('work/epoch_12.pth', ('CHECKPOINT', ), 'checkpoint')]
    message = str(error.value)
    assert 'tools/test.py: 2 path(s)' in message and WEIGHTS_DOC not in message
    assert '--cfg-options test_dataloader.dataset.data_root=DIR' in message
    assert not (in_empty_dir / 'work').exists()


def test_each_missing_folder_and_annotation_file_under_an_existing_root(in_empty_dir):
    seg = Config.fromfile(str(SEG_CONFIG))
    (in_empty_dir / ADE / ADE_FOLDERS[0]).mkdir(parents=True)
    assert missing_paths(seg, ['train', 'val']) == [
        MissingPath(f'{ADE}/annotations/training',
                    ('train_dataloader.dataset.data_prefix.seg_map_path', ), 'dataset'),
        MissingPath(f'{ADE}/images/validation',
                    ('val_dataloader.dataset.data_prefix.img_path', ), 'dataset'),
        MissingPath(f'{ADE}/annotations/validation',
                    ('val_dataloader.dataset.data_prefix.seg_map_path', ), 'dataset')]
    assert missing_paths(seg, ['train']) == missing_paths(seg, ['train', 'val'])[:1]

    det = Config.fromfile(str(DET_CONFIG))
    (in_empty_dir / 'data' / 'coco' / 'val2017').mkdir(parents=True)
    assert missing_paths(det, ['val']) == [
        MissingPath('data/coco/annotations/instances_val2017.json',
                    ('val_dataloader.dataset.ann_file', 'val_evaluator.ann_file'), 'dataset')]


def test_a_config_whose_paths_exist_passes(in_empty_dir):
    seg = Config.fromfile(str(SEG_CONFIG))
    for folder in ADE_FOLDERS:
        (in_empty_dir / ADE / folder).mkdir(parents=True)
    (in_empty_dir / 'checkpoints').mkdir()
    (in_empty_dir / SEG_WEIGHTS).write_bytes(b'')
    check_paths(seg, 'tools/train.py', ('train', 'val', 'test'), pretrained=True)

    det = Config.fromfile(str(DET_CONFIG))
    coco = in_empty_dir / 'data' / 'coco'
    for folder in ('train2017', 'val2017', 'annotations'):
        (coco / folder).mkdir(parents=True)
    for split in ('train', 'val'):
        (coco / 'annotations' / f'instances_{split}2017.json').write_text('{}')
    check_paths(det, 'tools/test.py', ('test', ), checkpoints=[('CHECKPOINT', SEG_WEIGHTS)])
    assert missing_paths(det, ['train'], pretrained=True) == [
        MissingPath('checkpoints/boat-swin-t_mmvit.pth', ('model.backbone.init_cfg', ),
                    'pretrained')]


def test_wrappers_urls_remote_storage_and_unused_splits(in_empty_dir):
    cfg = Config(dict(
        train_cfg=dict(type='IterBasedTrainLoop'), val_cfg=None,
        train_dataloader=dict(dataset=dict(type='RepeatDataset', times=2, dataset=dict(
            type='ConcatDataset', datasets=[
                dict(type='A', data_root='a', data_prefix=dict(img='x/')),
                dict(type='B', data_root='s3://bucket/b', data_prefix=dict(img='x/')),
                dict(type='C', data_root='c', backend_args=dict(backend='petrel')),
                dict(type='D', ann_file='d.json', data_prefix=dict(img='/abs/d'))]))),
        val_dataloader=dict(dataset=dict(type='E', data_root='e')),
        model=dict(init_cfg=[dict(type='Kaiming'), dict(type='Pretrained', checkpoint='m.pth')],
                   backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='https://x/b.pth')),
                   heads=[dict(init_cfg=dict(type='Pretrained', checkpoint='h.pth'))])))
    wrapped = 'train_dataloader.dataset.dataset.datasets'
    assert missing_paths(cfg, ['train', 'val'], pretrained=True,
                         checkpoints=[('load_from', None), ('resume', 'http://x/r.pth')]) == [
        MissingPath('a', (f'{wrapped}.0.data_root', ), 'dataset'),
        MissingPath('d.json', (f'{wrapped}.3.ann_file', ), 'dataset'),
        MissingPath('/abs/d', (f'{wrapped}.3.data_prefix.img', ), 'dataset'),
        MissingPath('m.pth', ('model.init_cfg', ), 'pretrained'),
        MissingPath('h.pth', ('model.heads.0.init_cfg', ), 'pretrained')]
    with pytest.raises(MissingPathsError) as error:
        check_paths(cfg, 'tools/train.py', ['train'], pretrained=True)
    assert (f'--cfg-options {wrapped}.0.data_root=DIR {wrapped}.3.data_root=DIR'
            in str(error.value))
    assert '--cfg-options model.heads.0.init_cfg=None model.init_cfg=None' in str(error.value)
    with pytest.raises(ValueError, match=r"splits=\['training'\]; allowed values: \('train', "):
        missing_paths(cfg, ['training'])


def test_cli_prints_one_message_without_a_traceback(in_empty_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]))
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'), str(SEG_CONFIG)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    message = proc.stderr[proc.stderr.index('tools/train.py: 2 path(s) the config names'):]
    assert message.endswith('a model on a generated toy dataset.\n')  # nothing after it
    assert not (in_empty_dir / 'work_dirs').exists()
