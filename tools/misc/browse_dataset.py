"""Save what a config's training pipeline produces (augmented image + ground truth) as PNGs.

    python tools/misc/browse_dataset.py CONFIG --out-dir DIR [--num 8] [--cfg-options k=v ...]
"""
import argparse
import os.path as osp

from mmengine.registry import DATASETS, VISUALIZERS

from mmvit_plugins.utils.runtime import DictAction, prepare_config


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
    for index in range(min(args.num, len(dataset))):
        item = dataset[index]
        sample = item['data_samples']
        image = item['inputs'].permute(1, 2, 0).numpy()[..., ::-1]  # BGR -> RGB
        name = osp.splitext(osp.basename(sample.img_path))[0]
        out_file = osp.join(args.out_dir, f'{index:03d}_{name}.png')
        visualizer.add_datasample(name, image, sample, draw_pred=False, show=False,
                                  out_file=out_file)
        print(out_file)


if __name__ == '__main__':
    main()
