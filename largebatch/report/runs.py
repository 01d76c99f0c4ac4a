"""Find run folders written by `lb-train` and turn each into one flat row.

A run folder is any folder holding ``config.yaml`` (written by the run recorder) or only Hydra's
``.hydra/config.yaml`` (a job that failed before its plan was valid writes nothing else). A folder
without ``summary.json`` did not finish: it is kept with status ``incomplete`` and a note saying how
far it got, so a sweep's failures are never dropped silently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

# runs.csv columns, in order. Rows also carry "_dir" (absolute folder) for the plots and provenance.
RUN_COLUMNS = [
    "optimizer", "batch", "batch_size", "seq_len", "stages", "seed", "status", "steps", "samples",
    "base_lr", "peak_lr", "scaling_rule", "schedule", "model_size", "final_loss", "eval_loss", "eval_accuracy",
    "eval_tokens", "downstream_task", "downstream_accuracy", "random_init_accuracy", "downstream_f1", "random_init_f1", "wall_time_s",
    "samples_per_s", "skipped_steps", "planned_steps", "planned_samples", "note", "run",
]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders at or below ``paths`` (sweep folders, run folders, or folders of sweeps)."""
    found: set[Path] = set()
    for root in map(Path, paths):
        candidates = [root, *(p for p in root.rglob("*") if p.is_dir())] if root.is_dir() else []
        for d in candidates:
            # Hydra's own .hydra/ folder holds a config.yaml too; it belongs to its parent run.
            if any(part.startswith(".") for part in d.relative_to(root).parts):
                continue
            if (d / "config.yaml").is_file() or (d / ".hydra" / "config.yaml").is_file():
                found.add(d.resolve())
    return sorted(found)


def collect_runs(paths: list[Path]) -> list[dict]:
    """One row per run folder found under ``paths`` (see :data:`RUN_COLUMNS`), sorted for reading."""
    rows = [load_run(d) for d in find_run_dirs(paths)]
    return sorted(rows, key=sort_key)


def sort_key(row: dict):
    return (optimizer_rank(row["optimizer"]), row["stages"] > 1, row["batch_size"] or 0, str(row["batch"]),
            row["seed"] if row["seed"] is not None else -1, row["run"])


def optimizer_rank(name) -> tuple:
    """The paper's optimizer first, its main baseline second, the rest alphabetically."""
    preferred = ["lamb", "adamw"]
    return (preferred.index(name), "") if name in preferred else (len(preferred), str(name))


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir).resolve()
    cfg = _load_config(run_dir)
    plan = read_json(run_dir / "plan.json") or []
    summary = read_json(run_dir / "summary.json")
    metrics = read_metrics(run_dir)
    train_lines = [m for m in metrics if "loss" in m]

    stages = plan or _stages_from_config(cfg)
    batch_label = (str(stages[-1]["batch"]) if len(stages) == 1
                   else "/".join(f"{s['batch']}@{s['seq_len']}" for s in stages))
    down = read_json(run_dir / "downstream.json") or {}
    down_random = read_json(run_dir / "downstream_random.json") or {}
    summary_or_empty = summary or {}
    row = {
        "optimizer": _get(cfg, "optimizer.name") or summary_or_empty.get("optimizer"),
        "batch": batch_label,
        "batch_size": stages[-1]["batch"] if stages else None,
        "seq_len": stages[-1]["seq_len"] if stages else None,
        "stages": len(stages),
        "seed": _get(cfg, "seed"),
        "status": "ok" if summary is not None else "incomplete",
        "base_lr": _get(cfg, "optimizer.lr"),
        # Multi-stage runs have one peak lr per stage (stage 2 re-warms, as in the paper's mixed batch).
        "peak_lr": (None if not plan else plan[0]["lr"] if len(plan) == 1
                    else "/".join(repr(p["lr"]) for p in plan)),
        "scaling_rule": _get(cfg, "scaling.rule"),
        "schedule": _get(cfg, "schedule.name"),
        "model_size": _get(cfg, "model.size"),
        "downstream_task": down.get("task") or down_random.get("task"),
        "downstream_accuracy": _finite(down.get("accuracy")),
        "random_init_accuracy": _finite(down_random.get("accuracy")),
        "downstream_f1": _finite(down.get("f1")),  # SQuAD fine-tuning reports F1 (0-100), not accuracy
        "random_init_f1": _finite(down_random.get("f1")),
        "planned_steps": sum(p["total_steps"] for p in plan) if plan else None,
        "planned_samples": sum(p["total_steps"] * p["batch"] for p in plan) if plan else None,
        "note": "",
        "run": display_path(run_dir),
        "_dir": run_dir,
    }
    if summary is not None:
        row.update(
            steps=summary.get("steps"), samples=summary.get("samples"), final_loss=_finite(summary.get("final_loss")),
            eval_loss=_finite(summary.get("eval/loss")), eval_accuracy=_finite(summary.get("eval/accuracy")),
            eval_tokens=summary.get("eval/tokens"), wall_time_s=summary.get("wall_time_s"),
            samples_per_s=summary.get("samples_per_s"), skipped_steps=summary.get("skipped_steps"),
        )
        if summary.get("skipped_steps"):
            row["note"] = f"{summary['skipped_steps']} step(s) skipped (non-finite)"
    else:
        # Results of an unfinished run are left empty: a half-trained loss must not sit beside finished ones.
        last = train_lines[-1] if train_lines else {}
        row.update(steps=last.get("step"), samples=last.get("samples"), final_loss=None, eval_loss=None,
                   eval_accuracy=None, eval_tokens=None, wall_time_s=None, samples_per_s=None,
                   skipped_steps=last.get("skipped_steps"))
        row["note"] = _incomplete_note(run_dir, last, row["planned_steps"], bool(plan))
    return row


def _incomplete_note(run_dir: Path, last: dict, planned_steps, has_plan: bool) -> str:
    if last:
        note = f"no summary.json: last logged step {last.get('step')} of {planned_steps}"
    elif has_plan:
        note = "no summary.json and no logged step"
    else:
        note = "no summary.json: failed before its plan was written"
    error = _last_error_line(run_dir)
    return f"{note}; log: {error}" if error else note


def _last_error_line(run_dir: Path) -> str | None:
    """The last line naming an error in the Hydra job log, to say why a run stopped."""
    for log_file in sorted(run_dir.glob("*.log")):
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()
                 if "Error" in ln or "error:" in ln]
        if lines:
            return lines[-1][-200:]
    return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
    return out


def _stages_from_config(cfg: dict) -> list[dict]:
    """Stage batches and lengths as configured, for runs that died before writing plan.json."""
    batch, seq_len = _get(cfg, "batch"), _get(cfg, "data.seq_len")
    stages = _get(cfg, "stages") or []
    if not stages:
        return [{"batch": batch, "seq_len": seq_len}] if batch is not None else []
    return [{"batch": s.get("batch") or batch, "seq_len": s.get("seq_len") or seq_len} for s in stages]


def _load_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # Hydra's copy may hold interpolations (${now:...}) that only resolve inside Hydra
        return OmegaConf.to_container(cfg, resolve=False)


def _get(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def read_json(path: Path):
    """A run file's JSON, or None when it is absent or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def display_path(path: Path) -> str:
    """Relative to the enclosing git checkout when there is one, else absolute."""
    path = Path(path).resolve()
    for parent in path.parents:
        if (parent / ".git").exists():
            return str(path.relative_to(parent))
    return str(path)
