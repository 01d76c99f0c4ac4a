"""The one owner of the batch split: a stage's GLOBAL batch -> this rank's micro-batches of each step.

A global batch of ``batch`` samples (or streams) is cut the same way for every workload: rank ``r``
of ``world_size`` takes the r-th contiguous share of ``batch / world_size`` and cuts it into
micro-batches of ``micro_batch`` (the plan has checked that both divide). :func:`rank_share` and
:func:`split_micro` are that cut; :func:`index_steps` applies it to shuffled samples (MLM, images),
and the stateful LM applies it to its streams (``largebatch.tasks.lm``).

Sample order (:class:`StepSampler`): one seeded permutation per epoch, independent of the batch, so a
batch ladder sees the same samples in the same order and differs only in how they are grouped into
steps. Step ``s`` takes ``perm[s*batch:(s+1)*batch]``; the tail that does not fill a batch is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

# Each stage of a multi-stage run draws its permutations (and masks) from its own range of epochs.
STAGE_EPOCH_STRIDE = 1000


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's randomness in one epoch (MLM masks, image augmentation): a function of
    (seed, epoch, index) alone, so every batch size, split and resumed run draws the same."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


def rank_share(batch: int, world_size: int, rank: int) -> slice:
    """Positions of a global batch that belong to ``rank``."""
    per_rank = batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def split_micro(n: int, micro_batch: int) -> list[slice]:
    """Positions of a rank's ``n`` samples that form each micro-batch, in order."""
    return [slice(i, i + micro_batch) for i in range(0, n, micro_batch)]


class StepSampler(Sampler):
    """A DataLoader ``batch_sampler`` that yields, per optimizer step, the sample indices of one rank."""

    def __init__(self, num_samples: int, batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        assert batch % world_size == 0, "checked by the plan"
        self.num_samples, self.batch, self.rank, self.world_size, self.seed = num_samples, batch, rank, world_size, seed
        self.epoch = 0
        self.first_step = 0  # where the next pass starts (a resumed run starts mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.batch

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        share = rank_share(self.batch, self.world_size, self.rank)
        for step in range(self.first_step, len(self)):
            yield perm[step * self.batch:][share].tolist()


def collate_micro(samples: list[dict], micro_batch: int) -> list[dict]:
    """One step's samples -> its micro-batches (runs in the DataLoader's workers)."""
    step = default_collate(samples)
    return [{k: v[part] for k, v in step.items()} for part in split_micro(len(samples), micro_batch)]


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A Ctrl-C or torchrun's SIGTERM reaches the workers too; the trainer stops cleanly after its step."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def index_steps(dataset: Dataset, plan, *, rank: int, world_size: int, seed: int, num_workers: int = 0,
                first_epoch: int = 0, start_step: int = 0, collate: Callable = collate_micro,
                pin_memory: bool = False) -> Iterator[list[dict]]:
    """Yield the micro-batches of one step after another from step ``start_step`` of the stage, forever,
    epoch after epoch. ``collate(samples, micro_batch)`` cuts one step's samples of this rank into
    micro-batches (variable-length samples bring their own, which pads).

    A dataset with ``set_epoch`` (masks drawn per epoch) is told the epoch before it is read; the
    DataLoader's workers are started per epoch, so they see it too. The loader has its own generator,
    so it leaves the global RNG (dropout's) as an uninterrupted run would."""
    sampler = StepSampler(len(dataset), plan.batch, rank=rank, world_size=world_size, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=torch.Generator(),
                        pin_memory=pin_memory,
                        collate_fn=partial(collate, micro_batch=plan.micro_batch),
                        worker_init_fn=_leave_stop_signals_to_the_trainer)
    epoch, sampler.first_step = divmod(start_step, len(sampler))
    while True:
        sampler.set_epoch(first_epoch + epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(first_epoch + epoch)
        yield from loader
        epoch, sampler.first_step = epoch + 1, 0
