"""What OpenMMLab users reach for, on the toy datasets with tiny models: tools/train.py
--auto-scale-lr, tools/test.py --tta, tools/misc/image_demo.py, and openmim (mim search / train /
test) on the package as ``pip install .`` installs it."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mmcv
import numpy as np
import pytest
from mmengine.config import Config

from .helpers import ROOT, load_tool
from .test_tools import DET_CONFIG, SEG_CONFIG, TINY, TINY_HEADS

SIZE = 64
BATCH = 2
toy = load_tool('tools/misc/make_toy_dataset.py')
image_demo = load_tool('tools/misc/image_demo.py')
visualize_attention = load_tool('tools/analysis/visualize_attention.py')


def _run(args, timeout: int = 300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run(list(map(str, args)), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _log(work_dir: Path) -> str:
    logs = sorted(work_dir.rglob('*.log'))
    assert logs, f'no log under {work_dir}'
    return logs[-1].read_text()


def write_toy_config(task: str, data_root: str, path: Path) -> Path:
    """The MAFormer-S config of the task, shrunk, on the toy set: one training iteration of
    batch 2 at a constant lr, then a checkpoint; no validation (tools/test.py evaluates)."""
    config = SEG_CONFIG if task == 'seg' else DET_CONFIG
    cfg = Config.fromfile(str(config))
    toy.toy_overrides(cfg, task, data_root, SIZE)
    cfg.merge_from_dict(dict(TINY, **TINY_HEADS[config]))
    if task == 'seg':
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1)
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=1)
    else:
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1)  # 2 images: 1 iteration
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_dataloader.batch_size = BATCH
    cfg.param_scheduler = []  # the logged lr is the optimizer's own
    cfg.default_hooks.logger.interval = 1
    cfg.dump(str(path))
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Per task: the toy config, the checkpoint of one ``tools/train.py --auto-scale-lr``
    iteration, and its log."""
    base = tmp_path_factory.mktemp('mm_tools')
    roots = dict(seg=toy.make_seg_toy(str(base / 'ade'), num_train=2, num_val=1, size=SIZE),
                 det=toy.make_det_toy(str(base / 'coco'), num_train=2, num_val=1, size=SIZE))
    runs = {}
    for task, root in roots.items():
        config = write_toy_config(task, root, base / f'toy_{task}.py')
        work_dir = base / f'work_{task}'
        _ok(_run([sys.executable, 'tools/train.py', config, '--auto-scale-lr',
                  '--work-dir', work_dir]))
        checkpoint = work_dir / ('iter_1.pth' if task == 'seg' else 'epoch_1.pth')
        assert checkpoint.is_file(), sorted(work_dir.iterdir())
        runs[task] = dict(config=config, root=Path(root), checkpoint=checkpoint,
                          log=_log(work_dir))
    return runs


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_auto_scale_lr_scales_the_lr_by_the_batch(trained, task):
    run = trained[task]
    base_lr = Config.fromfile(str(run['config'])).optim_wrapper.optimizer.lr
    ratio = BATCH / 16  # 1 process x batch 2 over the configs' base_batch_size
    assert f'Scaling the original LR by {ratio}' in run['log']
    logged = [float(v) for v in re.findall(r'\blr: ([0-9.e+-]+)', run['log'])]
    assert logged and logged[-1] == pytest.approx(base_lr * ratio, rel=1e-4), logged


def test_auto_scale_lr_needs_a_base_batch_size(trained):
    proc = _run([sys.executable, 'tools/train.py', trained['seg']['config'], '--auto-scale-lr',
                 '--cfg-options', 'auto_scale_lr.base_batch_size=0'])
    assert proc.returncode == 1
    assert '--auto-scale-lr needs auto_scale_lr.base_batch_size' in proc.stderr


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_tta_tests_the_augmented_model_and_reports_the_metric(trained, task, tmp_path):
    run = trained[task]
    out = _ok(_run([sys.executable, 'tools/test.py', run['config'], run['checkpoint'], '--tta',
                    '--work-dir', tmp_path]))
    log = _log(tmp_path)
    assert re.search(r'\(test\) \[1/1\]', log)
    if task == 'seg':
        assert "type='SegTTAModel'" in log and re.search(r'mIoU: \d', log), log[-2000:]
    else:
        assert "type='DetTTAModel'" in log and re.search(r'coco/bbox_mAP: \d', log), log[-2000:]
        assert 'segm_mAP' not in log
        assert 'DetTTAModel merges boxes only' in out


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_image_demo_paints_a_toy_image(trained, task, tmp_path):
    run = trained[task]
    folder = 'images/validation' if task == 'seg' else 'val'
    img = sorted((run['root'] / folder).glob('*.jpg'))[0]
    out_file = tmp_path / 'painted.png'
    written = image_demo.main([str(img), str(run['config']), str(run['checkpoint']),
                               '--out-file', str(out_file), '--score-thr', '0'])
    assert written == str(out_file)
    painted, image = mmcv.imread(str(out_file)), mmcv.imread(str(img))
    assert painted.shape == image.shape == (SIZE, SIZE, 3)
    assert np.abs(painted.astype(int) - image).max() > 50  # predictions drawn over the image


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_visualize_attention_on_a_toy_image(trained, task, tmp_path, capsys):
    """The trained MAFormer of a segmentor and of a detector: the pyramid (1 x 4 panels) and
    the window picture of both MAF blocks (1 x 5), at the image's size, their paths printed."""
    run = trained[task]
    folder = 'images/validation' if task == 'seg' else 'val'
    img = sorted((run['root'] / folder).glob('*.jpg'))[0]
    paths = visualize_attention.main([str(run['config']), str(run['checkpoint']), str(img),
                                      '--out-dir', str(tmp_path), '--query', '10', '50'])
    assert capsys.readouterr().out.splitlines()[-len(paths):] == paths  # after the load log
    shapes = {Path(p).name: mmcv.imread(p).shape for p in paths}
    assert shapes == {'pyramid.png': (SIZE, 4 * SIZE, 3),
                      'stages_0_blocks_0_window.png': (SIZE, 5 * SIZE, 3),
                      'stages_1_blocks_0_window.png': (SIZE, 5 * SIZE, 3)}


@pytest.mark.parametrize('extra,message', [
    (['--device', 'tpu'], "--device='tpu'; allowed values"),
    (['--score-thr', '2'], '--score-thr=2.0; allowed values: [0, 1]'),
    (['--opacity', '0'], '--opacity=0.0; allowed values: (0, 1]'),
])
def test_image_demo_rejects_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        image_demo.parse_args([str(SEG_CONFIG), str(SEG_CONFIG), str(SEG_CONFIG), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        image_demo.parse_args(['missing.jpg', str(SEG_CONFIG), str(SEG_CONFIG)])
    assert "IMG 'missing.jpg' is not a file" in capsys.readouterr().err


def _source_copy(tmp_path: Path) -> Path:
    """A copy of the source tree (what git tracks or would track): installs never touch the
    checkout itself."""
    files = _ok(_run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'])).split()
    src = tmp_path / 'src'
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    return src


def _installed_copy(tmp_path: Path) -> Path:
    """``pip install .`` of a copy of the source tree, into a folder to put on PYTHONPATH."""
    src, site = _source_copy(tmp_path), tmp_path / 'site'
    _ok(_run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
              '--no-build-isolation', '--no-index', '--target', site, src]))
    return site


def test_mim_search_train_and_test_the_installed_package(trained, tmp_path):
    mim = shutil.which('mim', path=str(Path(sys.executable).parent)) or shutil.which('mim')
    assert mim, 'openmim is part of requirements/tests.txt; run make env'
    site = _installed_copy(tmp_path)
    mim_dir = site / 'mmvit_plugins' / '.mim'
    for name in ('configs/upernet_boat_cswin_t_ade20k.py', 'configs/metafiles/boat.yml',
                 'tools/train.py', 'tools/test.py', 'tools/misc/image_demo.py',
                 'model-index.yml'):
        assert (mim_dir / name).is_file(), name
    env = dict(PYTHONPATH=str(site))

    out = _ok(_run([mim, 'search', 'mmvit_plugins', '--valid-config'], env=env, cwd=tmp_path))
    listed = set(re.findall(r"'([\w.]+)'", out))
    assert listed == {p.stem for p in (ROOT / 'configs').glob('*.py')}
    out = _ok(_run([mim, 'search', 'mmvit_plugins', '--config', 'upernet_boat_cswin_t_ade20k'],
                   env=env, cwd=tmp_path))
    assert re.search(r'ade20k/miou\s+50\.5', out) and 'cswin_tiny.pth.tar' in out, out

    config, work_dir = trained['seg']['config'], tmp_path / 'work'
    out = _ok(_run([mim, 'train', 'mmvit_plugins', config, '--work-dir', work_dir],
                   env=env, cwd=tmp_path))
    assert str(mim_dir / 'tools' / 'train.py') in out
    assert 'Iter(train) [1/1]' in _log(work_dir) and (work_dir / 'iter_1.pth').is_file()
    out = _ok(_run([mim, 'test', 'mmvit_plugins', config, '--checkpoint',
                    work_dir / 'iter_1.pth', '--work-dir', tmp_path / 'test'],
                   env=env, cwd=tmp_path))
    assert str(mim_dir / 'tools' / 'test.py') in out
    assert re.search(r'mIoU: \d', _log(tmp_path / 'test'))


def _without_pythonpath() -> dict:
    """The environment of a shell in the project's environment: nothing on PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}


def _mim_in(python: Path, args, cwd: Path) -> str:
    proc = subprocess.run([str(python), '-m', 'mim', *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=120, env=_without_pythonpath())
    return _ok(proc)


def _check_mim_finds(python: Path, package_dir: Path, cwd: Path) -> None:
    """mim search lists every config; mim's installed path (where train, test and run take
    tools/*.py from) is ``package_dir``, whose .mim holds them."""
    out = _mim_in(python, ['search', 'mmvit_plugins', '--valid-config'], cwd)
    assert set(re.findall(r"'([\w.]+)'", out)) == {p.stem for p in (ROOT / 'configs').glob('*.py')}
    found = subprocess.run(
        [str(python), '-c', 'from mim.utils import get_installed_path as g; '
         "print(g('mmvit_plugins'))"], cwd=cwd, text=True, capture_output=True, timeout=60,
        env=_without_pythonpath())
    _ok(found)
    assert Path(found.stdout.strip()).resolve() == package_dir.resolve()
    for tool in ('train.py', 'test.py', 'misc/image_demo.py'):
        assert (package_dir / '.mim' / 'tools' / tool).is_file(), tool
    # mim run takes the script from .mim/tools (its -h/--help are mim's own): argparse's
    # error for the missing arguments comes from image_demo.py itself
    run = subprocess.run([str(python), '-m', 'mim', 'run', 'mmvit_plugins', 'image_demo'],
                         cwd=cwd, text=True, capture_output=True, timeout=120,
                         env=_without_pythonpath())
    assert 'usage: image_demo.py' in run.stdout + run.stderr, run.stdout + run.stderr


def test_mim_finds_the_editable_install_that_setup_env_makes(tmp_path):
    """tools/misc/install_editable.sh (tools/setup_env.sh's install step) into a fresh
    environment that reuses this one's packages and holds pip's editable install, which mim
    misses: afterwards mim finds the checkout's package, and ``import mmvit_plugins`` is the
    checkout's (edits show through)."""
    src = _source_copy(tmp_path)
    venv = tmp_path / 'venv'
    _ok(_run([sys.executable, '-m', 'venv', '--without-pip', venv]))
    site = Path(_ok(_run([venv / 'bin' / 'python', '-c',
                          'import sysconfig; print(sysconfig.get_paths()["purelib"])'])).strip())
    (site / 'zz_reuse.pth').write_text('\n'.join(sys.path[1:]) + '\n')  # this env's packages
    python = venv / 'bin' / 'python'
    # what the environment had before: pip's (PEP 660) editable install, which mim misses
    _ok(_run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
              '--no-index', '-e', src]))
    search = subprocess.run([str(python), '-m', 'mim', 'search', 'mmvit_plugins'], cwd=tmp_path,
                            text=True, capture_output=True, timeout=120, env=_without_pythonpath())
    assert search.returncode != 0 and 'model_zoo.yml is not found' in search.stderr
    _ok(_run(['bash', src / 'tools' / 'misc' / 'install_editable.sh', python]))
    assert not list(site.glob('mmvit_plugins-*.dist-info'))  # the PEP 660 install is gone
    _check_mim_finds(python, src / 'mmvit_plugins', tmp_path)
    imported = subprocess.run(
        [str(python), '-c', 'import mmvit_plugins; print(mmvit_plugins.__file__)'],
        cwd=tmp_path, text=True, capture_output=True, timeout=120, env=_without_pythonpath())
    _ok(imported)
    assert imported.stdout.strip() == str(src / 'mmvit_plugins' / '__init__.py')


@pytest.mark.skipif(not (ROOT / '.venv' / '.mmvit_stamp').exists(),
                    reason='runs in the project environment made by make env')
def test_mim_works_in_the_project_environment(tmp_path):
    """`make env`'s .venv, as `make test` and `make demo` use it: mim finds this checkout."""
    _check_mim_finds(ROOT / '.venv' / 'bin' / 'python', ROOT / 'mmvit_plugins', tmp_path)
