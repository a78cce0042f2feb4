"""Save what a config's training pipeline produces (augmented image + ground truth) as PNGs.

    python tools/misc/browse_dataset.py CONFIG --out-dir DIR [--num 8] [--cfg-options k=v ...]
"""
import argparse
import os.path as osp

import numpy as np
from mmengine.registry import DATASETS, VISUALIZERS

from mmvit_plugins.utils.runtime import DictAction, config_scope, prepare_config


def main() -> None:
    parser = argparse.ArgumentParser(description='Browse a config\'s training data')
    parser.add_argument('config')
    parser.add_argument('--out-dir', required=True, help='where the PNG files go')
    parser.add_argument('--num', type=int, default=8, help='how many samples (default: 8)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if args.num < 1:
        parser.error(f'--num={args.num} must be >= 1')
    cfg = prepare_config(args.config, args.cfg_options)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = dataset.metainfo
    # mmseg's class-name labels do not draw with opencv 5, and hide small images anyway.
    extra = dict(with_labels=False) if config_scope(cfg) == 'mmseg' else {}
    for index in range(min(args.num, len(dataset))):
        item = dataset[index]
        sample = item['data_samples']
        image = np.ascontiguousarray(item['inputs'].permute(1, 2, 0).numpy()[..., ::-1])  # RGB
        name = osp.splitext(osp.basename(sample.img_path))[0]
        out_file = osp.join(args.out_dir, f'{index:03d}_{name}.png')
        visualizer.add_datasample(name, image, sample, draw_pred=False, show=False,
                                  out_file=out_file, **extra)
        print(out_file)


if __name__ == '__main__':
    main()
