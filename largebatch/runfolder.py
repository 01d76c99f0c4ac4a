"""The run folder's format, in one place: the names of its records, the statuses a run records, and their readers.

An ``lb-train`` run writes, in its folder (``hydra.run.dir``; :class:`largebatch.tracking.RunRecorder` writes
all but the checkpoints):

- ``status.json``: ``running`` first, then ``finished``, ``failed`` (with the error) or ``interrupted``, last;
- ``config.yaml`` (the resolved config), ``env.json`` (versions, git state, hardware; a resumed session adds
  ``env.resumed_at_step_<N>.json``), ``plan.json`` (each stage's steps, samples and lr);
- ``metrics.jsonl`` (one JSON object a logged step or evaluation) and ``summary.json`` (the end of the run);
- ``checkpoints/step_<N>/`` (:mod:`largebatch.checkpoint`) and ``model/`` (the final weights);
- ``downstream.json`` (``downstream_random.json``): ``lb-finetune``'s result from these weights (from random
  ones); ``examples.md``: seq2seq's first test translations;
- ``.lock``: held by the live run's main process (``train.lock_run_dir``).

Every other module names these files through this one, so the format changes here or nowhere.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "config.yaml"
HYDRA_CONFIG = ".hydra/config.yaml"  # Hydra's copy: all a job that failed before its plan was valid leaves
STATUS = "status.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
PLAN = "plan.json"
ENV = "env.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
LOCK = ".lock"
DISK_FULL_STATUS = ".status.disk_full.json"  # status.json to swap in when the disk is too full to write one
WANDB_RUN_ID = "wandb_run_id"
DOWNSTREAM, DOWNSTREAM_RANDOM = "downstream.json", "downstream_random.json"  # lb-finetune's, where it ran
EXAMPLES = "examples.md"  # seq2seq: a few test translations

# The small records a results folder keeps of each run (not its checkpoints or model): what a report reads.
RECORDS = (STATUS, CONFIG, ENV, PLAN, METRICS, SUMMARY)
# Anything of these in a folder means it holds a run (a new run there needs resume or overwrite).
RUN_RECORDS = (*RECORDS, WANDB_RUN_ID, CHECKPOINTS, MODEL)

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"


def env_name(resume_step: int | None) -> str:
    """The environment record of a session: the first's ``env.json``, a resumed one's beside it."""
    return ENV if resume_step is None else f"env.resumed_at_step_{resume_step}.json"


def read_json(path: Path):
    """A run file's JSON, or None when it is absent or torn."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of the run's ``metrics.jsonl`` (a run killed mid-write leaves a torn last line: dropped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_status(run_dir: Path) -> dict | None:
    """``status.json`` as written (None when absent or torn)."""
    status = read_json(Path(run_dir) / STATUS)
    return status if isinstance(status, dict) else None


def status_of(run_dir: Path) -> str:
    """The status the run recorded last, or "unknown"."""
    return str((read_status(run_dir) or {}).get("status", "unknown"))


def read_plan(run_dir: Path) -> list[dict]:
    """``plan.json``: one entry a stage (empty when absent)."""
    plan = read_json(Path(run_dir) / PLAN)
    return plan if isinstance(plan, list) else []


def config_path(run_dir: Path) -> Path | None:
    """The run's resolved ``config.yaml``, else Hydra's copy, else None (not a run folder)."""
    for name in (CONFIG, HYDRA_CONFIG):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read_config(run_dir: Path) -> dict | None:
    """The run's config as a plain dict (resolved where it resolves outside Hydra), or None."""
    from omegaconf import OmegaConf

    path = config_path(run_dir)
    if path is None:
        return None
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # Hydra's copy may hold interpolations (${now:...}) that only resolve inside Hydra
        return OmegaConf.to_container(cfg, resolve=False)


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_RECORDS)


def run_action(run_dir: Path) -> str:
    """What a driver does with one run folder: "skip", "diverged", "resume" or "start".

    skip: status.json says "finished" (the trainer writes it last) and summary.json is there, or, for a run
    of a trainer that wrote no status.json, summary.json is there (that trainer wrote it last).
    diverged: status.json says "failed" on a non-finite loss; the same run would diverge again.
    resume: the folder holds anything else (status running/failed/interrupted, or records without a
    status): the trainer continues it from its newest complete checkpoint, or starts it afresh there.
    start: no folder, or an empty one.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / STATUS)
    finished = (run_dir / SUMMARY).is_file()
    if isinstance(status, dict):
        if status.get("status") == FAILED and str(status.get("error", "")).startswith("NonFiniteError"):
            return "diverged"
        return "skip" if status.get("status") == FINISHED and finished else "resume"
    if finished and not (run_dir / STATUS).exists():
        return "skip"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "resume"
    return "start"


def copy_records(folders: dict[Path, Path], dest_root: Path, names: tuple[str, ...] = RECORDS) -> None:
    """Copy each run's small records from ``folders``' keys to ``dest_root`` / their values (relative paths):
    the results folder then holds everything its report was computed from."""
    import shutil

    for run_dir, relative in folders.items():
        dest = dest_root / relative
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (Path(run_dir) / name).exists():
                shutil.copy2(Path(run_dir) / name, dest / name)
