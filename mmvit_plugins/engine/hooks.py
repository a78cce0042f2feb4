"""Exact resume: the random number generators' state in every training checkpoint.

mmengine's checkpoints hold the weights, optimizer, schedulers and message hub, but not the
generators that drop path, dropout and the data pipeline draw from; a resumed run then draws
different numbers from the first iteration after the checkpoint on. ``RandomStateHook`` stores
them (torch CPU and every CUDA device, numpy's global generator, Python's ``random``; each
process's own) and puts them back exactly where the interrupted run stood.
"""
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_distributed
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

CHECKPOINT_KEY = 'random_states'
RandomState = Dict[str, Any]


def capture_random_states() -> RandomState:
    """The state of every global generator of this process, as tensors, ints, floats and tuples
    (what ``torch.load(weights_only=True)`` reads back)."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(bit_generator=str(name), key=torch.from_numpy(key.astype(np.int64)),
                   pos=int(pos), has_gauss=int(has_gauss),
                   cached_gaussian=float(cached_gaussian)),
        python=dict(version=int(version), internal=tuple(internal), gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_random_states(state: RandomState) -> None:
    """Set every global generator of this process to ``state`` (from
    :func:`capture_random_states`; tensors may sit on any device)."""
    torch.set_rng_state(state['torch'].cpu())
    numpy = state['numpy']
    np.random.set_state((numpy['bit_generator'], numpy['key'].cpu().numpy().astype(np.uint32),
                         numpy['pos'], numpy['has_gauss'], numpy['cached_gaussian']))
    python = state['python']
    random.setstate((python['version'], tuple(python['internal']), python['gauss_next']))
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            print_log(f'the checkpoint holds the random states of {len(cuda)} CUDA devices, this '
                      f'process sees {torch.cuda.device_count()}: CUDA generators not restored',
                      logger='current', level=30)


class _RestoreBeforeFetch:
    """Stands in for IterBasedTrainLoop's data iterator until the first batch after the
    checkpoint: the loop first fetches ``skip`` batches again to reach its place in the data (the
    pipeline of a ``num_workers=0`` loader draws from the generators), then the generators are
    restored and the original iterator put back."""

    def __init__(self, loop: Any, skip: int, state: RandomState) -> None:
        self._loop, self._inner = loop, loop.dataloader_iterator
        self._skip, self._state = skip, state

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self._skip > 0:
            self._skip -= 1
            return next(self._inner)
        restore_random_states(self._state)
        self._loop.dataloader_iterator = self._inner
        return next(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the generators' state in each checkpoint written during training; restore it on
    resume.

    What a checkpoint gets, under ``checkpoint['random_states']``: ``world_size`` and ``states``,
    a dict from rank to that process's state (see :func:`capture_random_states`). In a
    distributed run the ranks' states are gathered (one ``all_gather_object``) at the iterations
    or epochs where a ``CheckpointHook`` saves, so the checkpoint rank 0 writes holds all of
    them; on resume each rank restores its own. A checkpoint from another world size is not
    restored (a warning says so): the generators keep mmengine's seeding.

    Validation does not move the training generators: their state is kept before each
    validation and put back after it, so the training stream (and a resume from a checkpoint
    saved just before a validation) does not depend on how often the run validates.

    The generators are restored where the interrupted run stood: for ``IterBasedTrainLoop``
    right before the first batch after the checkpoint is fetched (after the loop has re-read the
    batches already trained on), for other loops at ``before_train``. The priority ``LOW`` runs
    it before ``CheckpointHook`` (``VERY_LOW``).
    """

    priority = 'LOW'

    def __init__(self) -> None:
        self._val_snapshot: Optional[RandomState] = None
        self._gathered: Optional[Dict[int, RandomState]] = None
        self._loaded = False
        self._pending: Optional[dict] = None
        self._seeds: Optional[tuple] = None  # (this run's, the checkpoint's)

    # -- saving ------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        self._gather_if_due(runner, 'iter', None)

    def after_train_epoch(self, runner) -> None:
        self._gather_if_due(runner, 'epoch', None)

    def before_val(self, runner) -> None:
        self._val_snapshot = capture_random_states()
        self._gather_if_due(runner, 'val', self._val_snapshot)

    def after_val(self, runner) -> None:
        if self._val_snapshot is not None:
            restore_random_states(self._val_snapshot)
            self._val_snapshot = None
        self._gathered = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        states = self._gathered
        if states is None:
            if is_distributed():
                print_log('RandomStateHook: this checkpoint was saved outside a CheckpointHook '
                          'interval; it holds the random states of rank 0 only',
                          logger='current', level=30)
            own = self._val_snapshot if self._val_snapshot is not None \
                else capture_random_states()
            states = {get_rank(): own}
        checkpoint[CHECKPOINT_KEY] = dict(world_size=get_world_size(), states=states)
        self._gathered = None

    def _gather_if_due(self, runner, point: str, state: Optional[RandomState]) -> None:
        """In a distributed run, collect every rank's ``state`` (default: now) if a checkpoint
        is saved at this point; rank 0's ``before_save_checkpoint`` writes them."""
        self._gathered = None
        if is_distributed() and self._checkpoint_due(runner, point):
            own = capture_random_states() if state is None else state
            self._gathered = dict(enumerate(all_gather_object(own)))

    @staticmethod
    def _checkpoint_due(runner, point: str) -> bool:
        """Whether a ``CheckpointHook`` of the runner saves at this ``point`` ('iter', 'epoch'
        after training; 'val': a best checkpoint). Without any, assume it does."""
        savers = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
        if not savers:
            return True
        for hook in savers:
            if point == 'val' and hook.save_best is not None:
                return True
            if point == 'iter' and not hook.by_epoch and (
                    hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
                    or (hook.save_last and hook.is_last_train_iter(runner))):
                return True
            if point == 'epoch' and hook.by_epoch and (
                    hook.every_n_epochs(runner, hook.interval, hook.save_begin)
                    or (hook.save_last and hook.is_last_train_epoch(runner))):
                return True
        return False

    # -- resuming ----------------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = True
        self._pending = checkpoint.get(CHECKPOINT_KEY)
        # Runner.resume switches to the checkpoint's seed only after the train loop (its sampler
        # and data workers) was built with this run's seed.
        self._seeds = (runner.seed, checkpoint.get('meta', {}).get('seed'))

    def before_train(self, runner) -> None:
        resumed = self._loaded and (runner.iter > 0 or runner.epoch > 0)
        pending, self._pending = self._pending, None
        if not resumed:
            return
        if pending is None:
            print_log('RandomStateHook: the checkpoint holds no random states (written without '
                      'this hook): random draws after resume differ from the interrupted run',
                      logger='current', level=30)
            return
        built_seed, saved_seed = self._seeds
        if saved_seed is not None and saved_seed != built_seed:
            print_log(f'RandomStateHook: the data sampler and workers of this run were seeded '
                      f'with {built_seed} before the checkpoint (seed {saved_seed}) was read: '
                      'data order and augmentation after resume differ from the interrupted '
                      f'run. For an exact resume set randomness=dict(seed={saved_seed}).',
                      logger='current', level=30)
        world_size = get_world_size()
        if pending['world_size'] != world_size or get_rank() not in pending['states']:
            print_log(f'RandomStateHook: the checkpoint holds the random states of '
                      f'{pending["world_size"]} process(es) (ranks '
                      f'{sorted(pending["states"])}), this run has {world_size}: the generators '
                      f'keep mmengine\'s seeding (seed {runner.seed}) instead',
                      logger='current', level=30)
            return
        state = pending['states'][get_rank()]
        loop = runner.train_loop
        if runner.iter > 0 and hasattr(loop, 'dataloader_iterator'):
            loop.dataloader_iterator = _RestoreBeforeFetch(loop, runner.iter, state)
        else:
            restore_random_states(state)
