"""Periodic checkpoints, exact resume, and a clean stop on SIGINT/SIGTERM.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding Accelerate's state (model, optimizer, every
rank's RNG states; under ``sharding=fsdp2`` the model and optimizer shards are in ``fsdp2/``, written by
``torch.distributed.checkpoint``), each rank's task state (a stateful LM's hidden states) and
``trainer_state.json`` (stage, position in the stage, counters, the open log window). It is written under a temporary name
and renamed when every rank has finished: a folder under its final name is complete by construction.
Data order and masks are functions of (seed, epoch, sample), so the position is all a resume needs.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from largebatch.errors import ConfigError, DiskFullError, LargebatchError
from largebatch.fileio import atomic_write_json, content_hash, replace_dir
from largebatch.runfolder import CHECKPOINTS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # every file of a checkpoint with its size and checksum, written last
# Keys that may differ between a run and its resumption (everything else must match).
RESUMABLE_DIFFERENCES = {"resume", "overwrite", "progress", "logger", "keep_checkpoints", "checkpoint_every_epochs",
                         "save_checkpoint"}


@dataclass
class TrainerState:
    stage_index: int = 0
    stage_step: int = 0  # the next step to run within the stage
    step: int = 0  # optimizer steps done, all stages
    samples: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    window: dict = field(default_factory=dict)  # the open log window's sums
    last_eval: dict | None = None
    last_loss: float | None = None
    elapsed_s: float = 0.0  # training wall time of the earlier sessions
    world_size: int = 1  # a checkpoint resumes only on as many processes (the LM's states are per rank)
    noise: dict = field(default_factory=dict)  # the gradient noise scale's window (largebatch.noise)


class Interrupted(LargebatchError):
    """SIGINT/SIGTERM: the run stopped cleanly after a checkpoint."""

    def __init__(self, message: str, step: int, signum: int):
        super().__init__(message)
        self.step = step
        self.exit_code = 128 + signum


class GracefulStop:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("%s received: stopping after this step with a checkpoint (send it again to exit at once)",
                    signal.Signals(signum).name)
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _encode(x):
    """JSON has no NaN or inf: a non-finite float (an eval metric of a run that skips non-finite steps, a
    noise-scale window) is kept as {"$float": "nan"}, so the resumed run gets it back exactly."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"$float": repr(x)}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    return x


def _decode(obj: dict):
    return float(obj["$float"]) if obj.keys() == {"$float"} else obj


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text(), object_hook=_decode))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and
            (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, parallel, task, state: TrainerState, run_dir: Path, keep: int) -> Path:
    """Every rank calls this; the folder appears under its final name only once it is complete.
    ``parallel`` (the run's ``largebatch.distributed`` strategy) saves what Accelerate does not hold:
    FSDP2's model and optimizer shards."""
    final = Path(run_dir) / CHECKPOINTS / f"step_{state.step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        return _save(accelerator, parallel, task, state, run_dir, keep, final, tmp)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint: its space back
        raise DiskFullError(f"the disk is full: writing checkpoint {final.name} of {run_dir} failed (the older "
                            f"checkpoints are whole); free space, then continue with resume=auto "
                            f"hydra.run.dir={run_dir}") from None


def _save(accelerator, parallel, task, state: TrainerState, run_dir: Path, keep: int, final: Path, tmp: Path) -> Path:
    state.world_size = accelerator.num_processes
    if accelerator.is_main_process:
        for stale in final.parent.glob(".step_*.tmp"):  # left by a killed session
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    parallel.save(tmp)
    torch.save(task.state_dict(), tmp / f"task_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", _encode(asdict(state)))
        write_manifest(tmp)
        replace_dir(tmp, final)  # the same step may be saved again (a finished run resumed)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_manifest(folder: Path) -> None:
    """Record every file of a finished checkpoint folder (size and checksum: whole up to 64 MiB, sampled
    above, as the data caches key their inputs), so a resume can tell a whole checkpoint from one damaged
    after it was written (a truncated or overwritten file)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    atomic_write_json(folder / MANIFEST, {"files": {str(p.relative_to(folder)): {"size": p.stat().st_size,
                                                                                  "blake2b": content_hash(p)}
                                                    for p in files}})


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed, or None when it is whole. A checkpoint written before manifests
    existed is checked for a readable trainer_state.json only."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or does not parse"
    if not (checkpoint / MANIFEST).is_file():
        return None
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{MANIFEST} does not parse"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if content_hash(path) != want["blake2b"]:
            return f"{name} does not match its checksum"
    return None


def newest_whole_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that is whole (a damaged newer one is skipped with a warning that
    names it); None when the run has none; a ConfigError when every one is damaged."""
    checkpoints = checkpoint_dirs(run_dir)
    damaged = []
    for checkpoint in reversed(checkpoints):
        why = damage(checkpoint)
        if why is None:
            return checkpoint
        damaged.append(f"{checkpoint.name}: {why}")
        log.warning("checkpoint %s is damaged (%s): resuming from an older one", checkpoint, why)
    if damaged:
        raise ConfigError(f"every checkpoint of {run_dir} is damaged ({'; '.join(damaged)}): nothing to resume "
                          "from; overwrite=true trains the run again from the start")
    return None


def load_checkpoint(accelerator, parallel, task, checkpoint: Path) -> TrainerState:
    state = read_trainer_state(checkpoint)
    if state.world_size != accelerator.num_processes:
        raise ConfigError(f"{checkpoint} was written by {state.world_size} process(es) and this run has "
                          f"{accelerator.num_processes}; resume it with the world size it was saved with")
    accelerator.load_state(str(checkpoint))
    parallel.load(checkpoint)
    task_state = checkpoint / f"task_state_{accelerator.process_index}.pt"
    if not task_state.is_file():
        raise ConfigError(f"{checkpoint} has no {task_state.name}: it was written by a run with another number "
                          f"of processes; resume with the world size it was saved with")
    task.load_state_dict(torch.load(task_state, weights_only=False))
    return state


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring the keys a resumption may change."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_DIFFERENCES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the run, {b!r} now")
    return out
