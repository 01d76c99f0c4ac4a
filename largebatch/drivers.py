"""The machinery the reproduction drivers share (scripts/reproduce_table1.py, scripts/reproduce_legw.py).

- :class:`Job` and :class:`Runner`: a list of ``lb-train`` runs, each in its own folder, run in this process
  or in a pool of spawned worker processes (:func:`largebatch.pool.train_in_worker`), longest first. The
  pool is shared by threads (a driver can run one thread per workload): a thread's runs carry its
  :meth:`Runner.priority`, and a free worker takes the queued run of the lowest priority, so the first
  workload finishes first and the others fill the workers it leaves idle (a sweep's rounds of 1-3). Every
  run folder is skipped, kept as diverged, resumed or started per :func:`run_action`, and a folder that holds
  a run made with another config is refused (:func:`config_changes`), so a driver called again picks up
  where it stopped and never mixes two configs in one folder.
- :func:`widening_sweep`: a grid search that widens past an edge holding the best value until the best is
  interior (the "untuned" protocol: one tuned base configuration, nothing tuned up the ladder), and
  :func:`next_lr`, the half-decade step it takes for learning rates.
- :class:`Clock`: the driver's wall time summed over every call on one work folder.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from largebatch.checkpoint import Interrupted
from largebatch.config import compose
from largebatch.errors import ConfigError, LargebatchError
from largebatch.fileio import atomic_write_json
from largebatch.pool import train_in_worker, worker_init
from largebatch.report.runs import BOOKKEEPING_KEYS, flatten_config, key_matches
from largebatch.runfolder import CONFIG, SUMMARY, read_json, run_action
from largebatch.train import train  # looked up at call time by Runner._run_here (tests replace it)

REPO = Path(__file__).resolve().parents[1]

# What makes a run resumable, passed to the trainer: periodic checkpoints on every run,
# and `resume=auto` for a run folder that holds an unfinished run (newest complete checkpoint, or a fresh
# start in that folder when it has none).
CHECKPOINT_EVERY_EPOCHS = 0.1
CHECKPOINT_OVERRIDES = [f"checkpoint_every_epochs={CHECKPOINT_EVERY_EPOCHS}"]
RESUME_OVERRIDES = ["resume=auto"]

log = logging.getLogger("largebatch.drivers")


class DriverStopped(LargebatchError):
    """The driver was stopped by a signal; its runs checkpointed, and calling it again resumes them. The
    process exits with 128 + the signal, as ``lb-train`` does (:func:`largebatch.errors.fail`)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.prefix = "stopped"


def load_ladders(name: str) -> dict:
    """A driver's ladders, as a user edits them: ``conf/ladders/<name>.yaml`` (plain YAML, read as it is)."""
    import yaml

    from largebatch.config import CONF_DIR

    path = CONF_DIR / "ladders" / f"{name}.yaml"
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the ladders ({error}); restore it from git") from None


def rel(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (shorter logs and records)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def config_changes(run_dir: Path, cfg) -> list[str]:
    """How the config saved in ``run_dir`` differs from ``cfg`` (bookkeeping keys such as resume aside)."""
    if not (Path(run_dir) / CONFIG).is_file():
        return []
    saved = flatten_config(OmegaConf.to_container(OmegaConf.load(Path(run_dir) / CONFIG), resolve=True))
    wanted = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    return [f"{k}: {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in sorted(saved.keys() | wanted.keys())
            if not key_matches(k, BOOKKEEPING_KEYS) and saved.get(k) != wanted.get(k)]


@dataclass
class Job:
    """One ``lb-train`` run: its overrides and its folder. ``experiment`` None: the runner's default one
    (none at all where the runner has none, e.g. ``model=seq2seq data=verses``)."""

    overrides: list[str]
    run_dir: Path
    experiment: str | None = None
    command: str = ""
    action: str = ""
    cfg: object = field(default=None, repr=False)
    cost: float = 0.0  # epochs per sample of batch, summed over stages: the pool starts the most steps first


def job_cost(cfg) -> float:
    """A run's optimizer steps up to a factor that its data sets (epochs / batch, summed over its stages;
    a stage's fraction is of the top-level epochs): enough to start the longest runs first. Small
    batches dominate a CPU ladder's cost: their steps, not their samples, are what the pool must spread."""
    if not cfg.stages:
        return cfg.epochs / cfg.batch
    return sum((s.epochs if s.get("epochs") is not None else (s.get("fraction") or 1.0) * cfg.epochs)
               / (s.get("batch") or cfg.batch) for s in cfg.stages)


class Progress:
    """The driver's one line per finished run: which, how long, how many are left and a time estimate (the
    mean run of this call that finished, ``jobs`` at a time; a failed or stopped run says nothing of the rest)."""

    def __init__(self, jobs: int):
        self.jobs, self.left, self.seconds, self.ended = jobs, 0, [], 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.left += n

    def finished(self, name: str, seconds: float, error: str | None = None) -> str:
        with self._lock:
            self.left = max(0, self.left - 1)
            self.ended += 1
            if not error:
                self.seconds.append(seconds)
            eta = sum(self.seconds) / len(self.seconds) * self.left / self.jobs if self.seconds and self.left else None
            return (f"{'failed' if error else 'done'}: {name} in {seconds / 60:.1f} min; {self.ended} run(s) "
                    f"ended in this call ({(time.perf_counter() - self.t0) / 60:.1f} min), {self.left} queued or running"
                    + (f", ~{eta / 60:.0f} min left at {self.jobs} at a time" if eta is not None else ""))


class Runner:
    """Runs jobs: in this process (``jobs=1``) or in a pool of ``jobs`` spawned processes with
    ``threads`` torch threads each. Every run is skipped, resumed or started per :func:`run_action`.
    ``default_experiment``: prepended as ``experiment=...`` to a job that names none.

    :meth:`run_many` may be called from several threads at once: the pool is shared, and a free worker
    takes the queued run of the lowest :meth:`priority` (then the most steps, then the oldest). Call
    :meth:`close` (or use the runner as a context manager) to stop the pool."""

    default_experiment: str | None = None
    worker = staticmethod(train_in_worker)  # what a pool worker runs (overrides, run_dir, threads) -> outcome
    settle_s = 0.0  # the pool waits this long after the first queued run, so every thread can queue its first

    def __init__(self, out: Path, jobs: int = 1, threads: int | None = None,
                 checkpoint_every: float = CHECKPOINT_EVERY_EPOCHS):
        self.out, self.jobs, self.steps, self.run_dirs = out, jobs, [], []
        self.started: list[Path] = []  # the run folders this call trained in (started or resumed), in order
        self.checkpoint = [f"checkpoint_every_epochs={checkpoint_every}"]
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool = None
        self._dispatchers: list[threading.Thread] = []
        self.stopping = False
        self.stop_signal = signal.SIGTERM  # the signal that stopped the driver (its exit code: 128 + it)
        self.progress = Progress(jobs)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def priority(self, value: int) -> Iterator[None]:
        """Runs this thread queues inside the block go before those of higher values."""
        before = getattr(self._local, "priority", 0)
        self._local.priority = value
        try:
            yield
        finally:
            self._local.priority = before

    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """In the main thread: SIGTERM or SIGINT stops the driver cleanly (:meth:`stop`); a second one kills it."""

        def handle(signum, frame):
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.warning("%s: stopping the runs after a checkpoint (again to exit at once)", signal.Signals(signum).name)
            self.stop(signum)
            if self.jobs == 1:  # no trainer loop holds the signal (its own handler would): setting up a run,
                # between runs, fine-tuning or the report. Stop here, at once; the next call resumes.
                raise DriverStopped("by a signal outside a training loop; call the driver again with the same "
                                    "arguments to resume", signum)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Cancel the queued runs and ask the running ones to stop after a checkpoint: SIGINT to each worker,
        which a running trainer takes as a stop and an idle worker ignores (a terminal's Ctrl-C reaches
        them itself, so it is not sent again: a second signal kills a run before its checkpoint). Every
        :meth:`run_many` then raises :class:`DriverStopped`."""
        self.stopping = True
        self.stop_signal = signum
        with self._lock:
            self._cancel_queued()
            workers = list(getattr(self._pool, "_processes", None) or {})
        if signum != signal.SIGINT:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def _cancel_queued(self) -> None:
        """Cancel every queued run (with the lock held)."""
        while not self._queue.empty():
            *_, done = self._queue.get_nowait()
            if done is not None:
                done.cancel()

    def make_pool(self):
        """The worker pool: ``jobs`` spawned processes (forked ones can hang on a running OpenMP pool)."""
        return ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_init)

    def close(self) -> None:
        """Stop the dispatchers and the pool: runs still queued are cancelled, running ones awaited."""
        with self._lock:
            self._cancel_queued()
            for _ in self._dispatchers:
                self._queue.put((math.inf, 0.0, next(self._order), None, None))
            dispatchers, self._dispatchers = self._dispatchers, []
            pool, self._pool = self._pool, None
        for thread in dispatchers:
            thread.join()
        if pool is not None:
            if getattr(pool, "_broken", False):
                end_broken_pool(pool, BROKEN_POOL_GRACE_S)
            pool.shutdown()

    def prepare(self, job: Job) -> Job:
        """Compose the job's config, decide its action and refuse a folder holding another config's run."""
        experiment = job.experiment or self.default_experiment
        job.overrides = [*([f"experiment={experiment}"] if experiment else []), "progress=false", *job.overrides,
                         *self.checkpoint]
        job.action = run_action(job.run_dir)
        if job.action == "resume":
            job.overrides += RESUME_OVERRIDES
        job.cfg = compose(job.overrides)
        changes = config_changes(job.run_dir, job.cfg) if job.action != "start" else []
        if changes:
            raise ConfigError(
                f"{rel(job.run_dir)} holds a run made with another config ({'; '.join(changes[:3])}): pass another "
                f"--work folder, or delete {rel(job.run_dir)} to run it again"
            )
        job.command = "lb-train " + " ".join(job.overrides)
        job.cost = job_cost(job.cfg)
        self.run_dirs.append(job.run_dir)
        return job

    def _record(self, job: Job, seconds: float | None = None, error: str | None = None) -> None:
        step = {"command": job.command, "run_dir": rel(job.run_dir), "action": job.action}
        if seconds is not None:
            step["seconds"] = round(seconds, 1)
            log.info("%s", self.progress.finished(rel(job.run_dir), seconds, error))
        if error:
            step["error"] = error
        self.steps.append(step)

    def train(self, overrides: list[str], run_dir: Path, experiment: str | None = None) -> dict | None:
        """One run in this process (the summary; None for a run that diverged)."""
        return self.run_many([Job(overrides, run_dir, experiment)], in_process=True)[0]

    def run_many(self, jobs: list[Job], in_process: bool = False) -> list[dict | None]:
        """Every job's summary (None where the run diverged or failed), in the order given."""
        jobs = [self.prepare(job) for job in jobs]
        results: list[dict | None] = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            if job.action in ("skip", "diverged"):
                log.info("= %s hydra.run.dir=%s: %s earlier, skipped", job.command, rel(job.run_dir),
                         "finished" if job.action == "skip" else "diverged")
                self._record(job)
                if job.action == "skip":
                    results[i] = json.loads((job.run_dir / SUMMARY).read_text())
            else:
                todo.append(i)
        self.progress.add(len(todo))
        if in_process or self.jobs == 1:
            for i in todo:
                results[i] = self._run_here(jobs[i])
            return results
        queued = {i: self._enqueue(jobs[i]) for i in todo}
        for i, future in queued.items():
            try:
                outcome, seconds = future.result()
            except CancelledError:
                outcome, seconds = {"interrupted": "cancelled before it started"}, None
            if "interrupted" in outcome or self.stopping:
                self._record(jobs[i], seconds, outcome.get("interrupted"))
                raise DriverStopped(f"by a signal ({rel(jobs[i].run_dir)}: {outcome.get('interrupted', 'done')});"
                                    " call the driver again with the same arguments to resume",
                                    self.stop_signal)
            self._record(jobs[i], seconds, outcome.get("error"))
            if "error" in outcome:
                log.warning("run %s failed: %s", rel(jobs[i].run_dir), outcome["error"][:300])
            results[i] = outcome.get("summary")
        return results

    def _enqueue(self, job: Job) -> Future:
        """Queue ``job`` for the pool; the future gives (the worker's outcome, seconds)."""
        done: Future = Future()
        with self._lock:
            if self.stopping:
                done.cancel()
                return done
            if self._pool is None:
                self._pool = self.make_pool()
            while len(self._dispatchers) < self.jobs:
                thread = threading.Thread(target=self._dispatch, args=(self._pool,), daemon=True,
                                          name=f"runner-{len(self._dispatchers)}")
                thread.start()
                self._dispatchers.append(thread)
            self._queue.put((getattr(self._local, "priority", 0), -job.cost, next(self._order), job, done))
        return done

    def _dispatch(self, pool) -> None:
        """One worker's dispatcher: the queued run that comes first, to the pool, until :meth:`close`."""
        time.sleep(self.settle_s)
        while True:
            *_, job, done = self._queue.get()
            if job is None:
                return
            log.info("+ %s hydra.run.dir=%s%s", job.command, rel(job.run_dir),
                     " (resuming)" if job.action == "resume" else "")
            self.started.append(job.run_dir)
            started = time.perf_counter()
            try:
                outcome = pool.submit(self.worker, job.overrides, str(job.run_dir), self.threads).result()
            except BaseException as error:  # noqa: BLE001 - handed to the thread waiting on this run
                done.set_exception(error)
            else:
                done.set_result((outcome, time.perf_counter() - started))

    def _run_here(self, job: Job) -> dict | None:
        log.info("+ %s hydra.run.dir=%s%s", job.command, rel(job.run_dir),
                 " (resuming)" if job.action == "resume" else "")
        self.started.append(job.run_dir)
        started = time.perf_counter()
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # as a pool worker does: two drivers side by side share the cores
        try:
            summary = train(job.cfg, job.run_dir)
        except Interrupted as stopped:  # the trainer's own handler took the signal: checkpointed
            self._record(job, time.perf_counter() - started, str(stopped))
            raise DriverStopped(f"by a signal ({rel(job.run_dir)}: {stopped}); call the driver again with the same "
                                "arguments to resume", stopped.exit_code - 128) from None
        except LargebatchError as error:
            if run_action(job.run_dir) != "diverged":
                raise
            self._record(job, time.perf_counter() - started, f"{type(error).__name__}: {error}")
            log.warning("run %s diverged: %s", rel(job.run_dir), error)
            return None
        finally:
            torch.set_num_threads(before)
        self._record(job, time.perf_counter() - started)
        return summary


BROKEN_POOL_GRACE_S = 30.0  # for a worker's run to finish the checkpoint a broken pool's SIGTERM asked for


def end_broken_pool(pool, grace_s: float) -> None:
    """End the workers of a broken pool (one was killed from outside, e.g. by the OOM killer). The pool
    sends the others SIGTERM; a worker whose run takes it as a stop writes its checkpoint and returns,
    and then waits forever on a call queue the broken pool no longer feeds, while the pool's shutdown
    waits on it. Give them ``grace_s`` in all to finish, then kill the ones still there."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + grace_s
    for process in list(getattr(pool, "_processes", {}).values()):
        wait([process.sentinel], timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("worker %d of the broken pool still there after its grace: killed", process.pid)
            process.kill()


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the half-decade grid 1, 3, 10, 30, ... (x 10^k)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** exponent
    if up:
        return float(f"{(3 if mantissa < 2 else 10) * 10 ** exponent:.0e}")
    return float(f"{(1 if mantissa > 2 else 0.3) * 10 ** exponent:.0e}")


def finite_or_inf(x) -> float:
    """A sweep's score: the value, or +inf for a missing or non-finite one (a diverged run is never best)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def widening_sweep(grid: dict[str, list[float]], run: Callable[[list[tuple[str, float]]], list[float]], *,
                   max_widen: int, step: Callable[[float, bool], float | None] = next_lr,
                   known: dict[str, dict[float, float]] | None = None) -> dict[str, dict]:
    """A grid search per name that widens past an edge holding the best score, up to ``max_widen`` times.

    ``grid``: {name: values}; ``run(todo)`` scores each (name, value) of ``todo`` (lower is better; +inf for a
    diverged run, see :func:`finite_or_inf`); every round runs the values of all names together (one pool).
    ``step(value, up)`` is the next value past an edge, or None where the grid cannot go further (a warmup
    below 0, or longer than the run allows): that edge then stays the best. ``known``: scores already
    measured (not run again). Returns {name: {"chosen", "interior", "scores": {value: score}, "values"}}.
    """
    grid = {name: sorted(values) for name, values in grid.items()}
    scores: dict[str, dict[float, float]] = {name: dict((known or {}).get(name, {})) for name in grid}
    for round_ in range(max_widen + 1):
        todo = [(name, v) for name, values in grid.items() for v in values if v not in scores[name]]
        for (name, v), score in zip(todo, run(todo) if todo else []):
            scores[name][v] = score
        widened = False
        for name, values in grid.items():
            best = min(values, key=lambda v: scores[name][v])
            if best in (values[0], values[-1]) and round_ < max_widen:
                beyond = step(best, best == values[-1])
                if beyond is not None and beyond not in values:
                    values.append(beyond)
                    values.sort()
                    widened = True
        if not widened:
            break
    out = {}
    for name, values in grid.items():
        chosen = min(values, key=lambda v: scores[name][v])
        out[name] = {"chosen": chosen, "interior": chosen not in (values[0], values[-1]) or len(values) == 1,
                     "scores": {v: scores[name][v] for v in values}, "values": values}
    return out


class Clock:
    """Wall time of this driver over every call on one work folder (an interrupted call included). With
    ``autosave_s``, a daemon thread saves it that often, so a killed driver loses at most that much.

    A call that trained nothing (every run had finished earlier: it only re-renders the report) is not a
    call: :meth:`idle` takes it back. ``shared_with`` gathers, over the calls, the other tasks that shared
    the workers."""

    def __init__(self, path: Path, autosave_s: float | None = None):
        self.path, self.started = path, time.perf_counter()
        earlier = read_json(path) or {}
        self.earlier_s, self.calls = float(earlier.get("seconds", 0.0)), int(earlier.get("calls", 0)) + 1
        self.shared_with: set[str] = set(earlier.get("shared_with", []))
        self._idle, self._lock = False, threading.Lock()
        self._stopped = threading.Event()
        if autosave_s:
            threading.Thread(target=self._autosave, args=(autosave_s,), daemon=True, name="clock").start()

    def _autosave(self, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            self.save()

    def stop(self) -> None:
        """Save a last time and stop the autosave."""
        self._stopped.set()
        self.save()

    def idle(self) -> None:
        """This call did no work: neither its time nor the call itself counts."""
        with self._lock:
            if self._idle:
                return
            self._idle, self.calls = True, self.calls - 1
        self.save()

    def total_s(self) -> float:
        return self.earlier_s + (0.0 if self._idle else time.perf_counter() - self.started)

    def save(self) -> None:
        with self._lock:  # the autosave thread and the driver's: one record at a time, never one from before idle()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"seconds": round(self.total_s(), 1), "calls": self.calls}
            if self.shared_with:
                record["shared_with"] = sorted(self.shared_with)
            atomic_write_json(self.path, record)
