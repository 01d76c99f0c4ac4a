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

    # From here to the trainer's own handler (its loop) a stop raises KeyboardInterrupt: an idle worker's
    # SIG_IGN would drop a stop sent while the run sets up (data, tokenizer, model) and let it train to the end.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return {"summary": train(compose(overrides), Path(run_dir))}
    except Interrupted as stopped:  # SIGINT from the driver (Runner.stop) or a terminal: checkpointed, resumable
        return {"interrupted": str(stopped)}
    except KeyboardInterrupt:
        return {"interrupted": "stopped by a signal outside its training loop (setting up, or writing its last "
                               "records); the next call resumes it from its newest checkpoint, if any"}
    except LargebatchError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def die_with_parent(poll_s: float = 1.0) -> None:
    """A watchdog thread: when the driver that spawned this worker dies (``kill -9``, the OOM killer: no
    chance to stop its pool), the worker is re-parented and sends itself SIGTERM. A running trainer takes it
    as a stop (checkpoint, then exit: the next driver call resumes the run, which the dead worker no longer
    holds); an idle worker exits. No orphan trains on or waits forever."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(120)  # a run checkpointing on the first signal gets this long, then a second one ends it
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def worker_init() -> None:
    """Pool initializer: :func:`ignore_interrupts_while_idle` and :func:`die_with_parent`."""
    ignore_interrupts_while_idle()
    die_with_parent()


def ignore_interrupts_while_idle() -> None:
    """Pool initializer: a worker between runs ignores SIGINT, the signal a driver stops its runs with
    (:meth:`largebatch.drivers.Runner.stop`; a terminal's Ctrl-C too). It has nothing to checkpoint, and a
    worker that dies breaks the pool under the runs still going on the others (they would end with
    BrokenProcessPool, not their checkpoint). During a run the trainer takes the signal (in its loop: first,
    checkpoint and stop; second, exit at once). SIGTERM keeps its default: a broken pool terminates its
    workers with it. (DataLoader workers ignore both: largebatch/data/batching.py.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
