"""Run records: what every run writes into its output folder, and W&B.

    config.yaml     the resolved config
    env.json        command, package versions, git sha + dirty flag, device, world size
    plan.json       the resolved stages (batch, accumulation, steps, lr, warmup)
    status.json     running (written with the config), then finished / failed / interrupted, with the error
    metrics.jsonl   append-only, one JSON object per log or eval step
    summary.json    final metrics, wall time, samples seen (written before the final checkpoint)
Only the main process writes; the other ranks get a recorder that does nothing.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from largebatch import runfolder
from largebatch.errors import ConfigError
from largebatch.fileio import atomic_write_json, atomic_write_text

# Metric fields measured in wall-clock time: they differ between two sessions of the same run by nature.
TIMING_KEYS = ("samples_per_s", "tokens_per_s", "tflops", "mfu")
PACKAGES = ("largebatch", "torch", "torchvision", "transformers", "tokenizers", "datasets", "accelerate",
            "hydra-core", "omegaconf", "wandb", "timm", "torch-optimizer")


def git_state(cwd: Path | None = None) -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        sha = run("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"sha": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def device_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def environment(world_size: int = 1, device: str = "cpu") -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"command": " ".join(sys.argv), "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions, "git": git_state(), "device": device, "world_size": world_size,
            "hardware": device_info()}


class RunRecorder:
    """Writes a run's records. ``resume_step``: continue a run's records, keeping the metric lines up to
    that step (lines a killed session wrote after its last checkpoint are dropped: the resumed run
    writes them again)."""

    def __init__(self, run_dir: Path, cfg, *, enabled: bool, world_size: int, device: str,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / runfolder.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        except OSError as error:
            raise ConfigError(f"cannot write the run folder {self.run_dir}: {error.strerror}; choose a writable "
                              "hydra.run.dir") from None
        write_hydra_records(self.run_dir, cfg)
        # written now, while there is space: status() swaps it in (a rename needs none) if the disk fills
        atomic_write_json(self.run_dir / runfolder.DISK_FULL_STATUS, {"status": "failed", "error": (
            "DiskFullError: the disk filled while this run wrote its records; free space, then resume=auto")})
        self.status("running")
        # the first session's env.json stays; a resumed session records its own next to it
        atomic_write_json(self.run_dir / runfolder.env_name(resume_step), environment(world_size, device))
        metrics = self.run_dir / runfolder.METRICS
        if resume_step is not None and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(metrics, "".join(f"{line}\n" for line in kept))
        elif metrics.exists():
            metrics.unlink()
        self._metrics = open(metrics, "a")  # noqa: SIM115 (closed in finish)
        if cfg.logger.name == "wandb":
            self._wandb = _start_wandb(cfg, self.run_dir, resume=resume_step is not None)

    def status(self, status: str, **details) -> None:
        """status.json: running (written first), then finished, failed or interrupted (written last). On a
        full disk a failure is recorded by renaming the pre-written one into place."""
        if not self.enabled:
            return
        try:
            atomic_write_json(self.run_dir / runfolder.STATUS, {"status": status, "time": time.strftime(
                "%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **_finite(details)})
        except OSError as error:
            spare = self.run_dir / runfolder.DISK_FULL_STATUS
            if error.errno != errno.ENOSPC or status == "finished" or not spare.is_file():
                raise
            os.replace(spare, self.run_dir / runfolder.STATUS)

    def plan(self, plans: list) -> None:
        if self.enabled:
            atomic_write_json(self.run_dir / runfolder.PLAN, [p.as_dict() for p in plans])
            if self._wandb:
                self._wandb.config.update({"plan": [p.as_dict() for p in plans]}, allow_val_change=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(_finite(metrics), allow_nan=False) + "\n")
        self._metrics.flush()
        if self._wandb:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics.get("step"))

    def summary(self, summary: dict) -> None:
        if self.enabled:
            atomic_write_json(self.run_dir / runfolder.SUMMARY, _finite(summary))
            if self._wandb:
                self._wandb.summary.update(summary)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._wandb:
            self._wandb.finish()
            self._wandb = None


def _step_of(line: str) -> float:
    """A metric line's step; infinity for a blank line or one a kill cut short (it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def write_hydra_records(run_dir: Path, cfg) -> None:
    """``.hydra/config.yaml`` (as composed) and ``.hydra/overrides.yaml`` (the command's overrides) of an
    lb-train run, written by the trainer once the folder is accepted (Hydra's own copy is off:
    conf/hydra/default.yaml). Nothing outside an lb-train command."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / runfolder.CONFIG, OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
        list(HydraConfig.get().overrides.task))))


def _finite(record: dict) -> dict:
    """JSON has no NaN or inf: a non-finite number is recorded as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _start_wandb(cfg, run_dir: Path, resume: bool):
    """A resumed run continues the same W&B run (its id is kept in the run folder)."""
    import wandb

    id_file = run_dir / runfolder.WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id + "\n")

    group = cfg.logger.group
    if group is None:
        try:  # one group per multirun sweep: the sweep folder's name
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            if hc.mode.name == "MULTIRUN":
                group = Path(hc.sweep.dir).name
        except ValueError:
            pass
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, group=group,
        tags=list(cfg.logger.tags), dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
