"""Runs in worker processes, for drivers that keep several runs going at once (scripts/reproduce_*.py).

A CPU run of a small model leaves cores idle between its small matmuls; two runs with one torch thread
each use two cores better than one run with two (measured in experiments/lamb_table1/README.md).
Workers are spawned, not forked: a forked copy of a process whose OpenMP pool is running can hang.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path


def train_in_worker(overrides: list[str], run_dir: str, threads: int) -> dict:
    """One ``lb-train`` run: {"summary": ...}, {"interrupted": ...} for a run stopped by a signal after a
    checkpoint, or {"error": ...} for a run that failed with a largebatch error (a non-finite loss, a config
    problem); anything else propagates to the caller."""
    import torch

    from largebatch.config import compose
    from largebatch.errors import LargebatchError
    from largebatch.train import train

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, force=True)
    from largebatch.checkpoint import Interrupted

    try:
        return {"summary": train(compose(overrides), Path(run_dir))}
    except Interrupted as stopped:  # SIGTERM from the driver (Runner.stop): checkpointed, resumable
        return {"interrupted": str(stopped)}
    except LargebatchError as error:
        return {"error": f"{type(error).__name__}: {error}"}


def ignore_interrupts_while_idle() -> None:
    """Pool initializer: a worker between runs ignores SIGINT, the signal a driver stops its runs with
    (:meth:`largebatch.drivers.Runner.stop`; a terminal's Ctrl-C too). It has nothing to checkpoint, and a
    worker that dies breaks the pool under the runs still going on the others (they would end with
    BrokenProcessPool, not their checkpoint). During a run the trainer's own handler takes the signal
    (first: checkpoint and stop; second: exit at once) and restores this one after. SIGTERM keeps its
    default: a broken pool terminates its workers with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
