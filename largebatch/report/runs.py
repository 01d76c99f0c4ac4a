"""Find run folders written by `lb-train` and turn each into one flat row.

A run folder is any folder holding ``config.yaml`` (written by the run recorder) or only Hydra's
``.hydra/config.yaml`` (a job that failed before its plan was valid writes nothing else).

A row's ``status`` is ``ok`` for a finished run, else what ``status.json`` says (``failed``,
``interrupted``, ``running``: the trainer writes it first and last, with the error), or ``incomplete``
for a folder without a status and without ``summary.json`` (an older trainer, or a job that died before
writing either). Only ``ok`` runs have results; the others are kept, with a note saying how far they got
and why they stopped, so a sweep's failures are never dropped silently nor mixed with finished runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from largebatch.runfolder import (  # noqa: F401 - the readers' home
    DOWNSTREAM,
    DOWNSTREAM_RANDOM,
    PLAN,
    STATUS,
    SUMMARY,
    config_path,
    read_config,
    read_json,
    read_metrics,
)

# runs.csv columns, in order. ``batch``: the global batch of the (last) stage, an int; ``batch_schedule``:
# the label, "256" for one stage, "512@32/256@64" (batch@seq_len per stage) for several. ``differs_in``: the
# config keys, seed aside, in which the run differs from other runs of its optimizer (see
# :func:`mark_differences`). ``steps_to_target``/``samples_to_target``: when the run's eval loss first reached the
# table's target loss (set by ``summary.mark_targets``, None = never or no target); ``b_noise``: the gradient noise
# scale B_simple of the run's last half (see :func:`noise_scale_summary`). Rows also carry "_dir" (absolute
# folder) for the plots and provenance, "_config" (the flattened resolved config) for grouping, and "_eval" (the
# eval points of the last stage, see :func:`eval_points`) for the steps to target.
RUN_COLUMNS = [
    "optimizer", "batch", "batch_schedule", "seq_len", "stages", "seed", "status", "steps", "samples",
    "base_lr", "peak_lr", "scaling_rule", "schedule", "model_size", "final_loss", "eval_loss", "eval_accuracy",
    "eval_tokens", "steps_to_target", "samples_to_target", "b_noise", "downstream_task", "downstream_accuracy",
    "random_init_accuracy", "downstream_f1", "random_init_f1", "wall_time_s", "samples_per_s", "skipped_steps",
    "planned_steps", "planned_samples", "differs_in", "note", "run",
]

# Config keys that say how a run was executed or recorded, not what it computed: runs that differ only in
# these (and the seed) are seeds of one cell. A key ending in "." covers everything under it.
BOOKKEEPING_KEYS = ("progress", "logger.", "data.cache_dir", "data.num_workers", "save_checkpoint",
                    "checkpoint_every_epochs", "keep_checkpoints", "resume", "overwrite", "per_layer_trust_ratios",
                    "final_eval")
# The batch ladder's own axis: shown by batch_schedule, so left out of differs_in across rungs.
AXIS_KEYS = ("batch", "micro_batch", "stages", "stages.")
STATUSES = ("ok", "failed", "interrupted", "running", "incomplete")


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders at or below ``paths`` (sweep folders, run folders, or folders of sweeps)."""
    found: set[Path] = set()
    for root in map(Path, paths):
        candidates = [root, *(p for p in root.rglob("*") if p.is_dir())] if root.is_dir() else []
        for d in candidates:
            # Hydra's own .hydra/ folder holds a config.yaml too; it belongs to its parent run.
            if any(part.startswith(".") for part in d.relative_to(root).parts):
                continue
            if config_path(d) is not None:
                found.add(d.resolve())
    return sorted(found)


def collect_runs(paths: list[Path]) -> list[dict]:
    """One row per run folder found under ``paths`` (see :data:`RUN_COLUMNS`), sorted for reading."""
    rows = [load_run(d) for d in find_run_dirs(paths)]
    mark_differences(rows)
    return sorted(rows, key=sort_key)


def sort_key(row: dict):
    return (optimizer_rank(row["optimizer"]), row["stages"] > 1, row["batch"] or 0, str(row["batch_schedule"]),
            row.get("differs_in") or "", row["seed"] if row["seed"] is not None else -1, row["run"])


def key_matches(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``patterns`` (a pattern ending in "." covers every key below it)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flatten_config(cfg, prefix: str = "") -> dict:
    """{"optimizer.lr": 0.001, "stages.1.batch": 128, "data.sources": "[wiki, bible]", ...}: dicts and lists of
    dicts are opened up, lists of plain values kept whole (as text), so every key is comparable."""
    out: dict = {}
    if isinstance(cfg, dict):
        items = cfg.items()
    elif isinstance(cfg, list) and any(isinstance(v, (dict, list)) for v in cfg):
        items = ((str(i), v) for i, v in enumerate(cfg))
    else:
        return {prefix.rstrip("."): "[" + ", ".join(map(str, cfg)) + "]" if isinstance(cfg, list) else cfg}
    for key, value in items:
        if isinstance(value, (dict, list)) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "[]" if value == [] else "{}" if value == {} else value
    return out


def result_config(row: dict) -> dict:
    """The run's flattened config less the seed and the bookkeeping keys: equal for seeds of one cell."""
    return {k: v for k, v in (row.get("_config") or {}).items()
            if k != "seed" and not key_matches(k, BOOKKEEPING_KEYS)}


def _differing(rows: list[dict]) -> set[str]:
    configs = [result_config(r) for r in rows]
    keys = set().union(*configs) if configs else set()
    return {k for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def mark_differences(rows: list[dict]) -> None:
    """Set each row's ``differs_in``: "key=value, ..." for the config keys (seed and bookkeeping aside) that
    vary between the runs of its optimizer, leaving out the ladder's axis (batch, stages), which the batch
    schedule shows, unless runs with the same batch schedule differ there too."""
    by_optimizer: dict = {}
    for r in rows:
        by_optimizer.setdefault(r["optimizer"], []).append(r)
    for group in by_optimizer.values():
        keys = {k for k in _differing(group) if k != "optimizer.name" and not key_matches(k, AXIS_KEYS)}
        twins: dict = {}
        for r in group:
            twins.setdefault(r["batch_schedule"], []).append(r)
        for same_batch in twins.values():
            shown = sorted(keys | _differing(same_batch))
            for r in same_batch:
                config = result_config(r)
                r["differs_in"] = ", ".join(f"{k}={_show(config.get(k))}" for k in shown)


def _show(value) -> str:
    return "null" if value is None else repr(value) if isinstance(value, float) else str(value)


def optimizer_rank(name) -> tuple:
    """The paper's optimizer first, its main baseline second, the rest alphabetically."""
    preferred = ["lamb", "adamw"]
    return (preferred.index(name), "") if name in preferred else (len(preferred), str(name))


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir).resolve()
    cfg = read_config(run_dir)
    if cfg is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml (nor Hydra's .hydra/config.yaml)")
    plan = read_json(run_dir / PLAN) or []
    summary = read_json(run_dir / SUMMARY)
    recorded = read_json(run_dir / STATUS)
    recorded = recorded if isinstance(recorded, dict) else None
    metrics = read_metrics(run_dir)
    train_lines = [m for m in metrics if "loss" in m]

    stages = plan or _stages_from_config(cfg)
    batch_schedule = (str(stages[-1]["batch"]) if len(stages) == 1
                      else "/".join(f"{s['batch']}@{s['seq_len']}" for s in stages))
    down = read_json(run_dir / DOWNSTREAM) or {}
    down_random = read_json(run_dir / DOWNSTREAM_RANDOM) or {}
    summary_or_empty = summary or {}
    status = _status(recorded, summary)
    row = {
        "optimizer": _get(cfg, "optimizer.name") or summary_or_empty.get("optimizer"),
        "batch": stages[-1]["batch"] if stages else None,
        "batch_schedule": batch_schedule,
        "seq_len": stages[-1]["seq_len"] if stages else None,
        "stages": len(stages),
        "seed": _get(cfg, "seed"),
        "status": status,
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
        "steps_to_target": None,
        "samples_to_target": None,
        "b_noise": None,
        "differs_in": "",
        "note": "",
        "run": display_path(run_dir),
        "_dir": run_dir,
        "_config": flatten_config(cfg),
        "_eval": [],
    }
    if status == "ok":
        row.update(
            steps=summary.get("steps"), samples=summary.get("samples"), final_loss=_finite(summary.get("final_loss")),
            eval_loss=_finite(summary.get("eval/loss")), eval_accuracy=_finite(summary.get("eval/accuracy")),
            test_loss=_finite(summary.get("test/loss")),
            eval_tokens=summary.get("eval/tokens"), wall_time_s=summary.get("wall_time_s"),
            samples_per_s=summary.get("samples_per_s"), skipped_steps=summary.get("skipped_steps"),
            b_noise=noise_scale_summary(train_lines, summary.get("steps")),
            _eval=eval_points(metrics, plan[-1]["name"] if len(plan) > 1 else None),
        )
        if summary.get("skipped_steps"):
            row["note"] = f"{summary['skipped_steps']} step(s) skipped (non-finite)"
    else:
        # Results of an unfinished run are left empty: a half-trained loss must not sit beside finished ones.
        last = train_lines[-1] if train_lines else {}
        step = (recorded or {}).get("step")
        row.update(steps=step if isinstance(step, int) else last.get("step"), samples=last.get("samples"),
                   final_loss=None, eval_loss=None, eval_accuracy=None, test_loss=None, eval_tokens=None, wall_time_s=None,
                   samples_per_s=None, skipped_steps=last.get("skipped_steps"))
        row["note"] = _unfinished_note(run_dir, status, recorded, summary, last, row["planned_steps"], bool(plan))
    return row


def eval_points(metrics: list[dict], stage: str | None = None) -> list[dict]:
    """The run's eval points as {"step", "samples", "loss"}, fewest samples first; of ``stage`` only when given
    (a multi-stage run's last stage: its earlier stages are evaluated at another sequence length, on other
    held-out sequences, so their losses are not comparable with a single-stage run's)."""
    points = {}
    for m in metrics:
        loss = _finite(m.get("eval/loss"))
        if loss is None or m.get("samples") is None or (stage is not None and m.get("stage") != stage):
            continue
        points[m["samples"]] = {"step": m.get("step"), "samples": m["samples"], "loss": loss}  # a repeat: the last
    return [points[k] for k in sorted(points)]


def noise_scale_summary(train_lines: list[dict], steps: int | None = None) -> float | None:
    """The run's gradient noise scale over the last half of training (step > steps / 2; it grows as the loss
    falls, so early estimates say little about where training ends): the mean of the logged tr(Sigma)
    estimates over the mean of the |G|^2 estimates ("noise/trace", "noise/grad_sq"), in samples (McCandlish
    et al. 2018 average each before dividing: a mean of per-line ratios would be ruled by the lines whose
    |G|^2 estimate is near zero). None when the run logged none, or the mean |G|^2 is not positive."""
    last = steps or max((m.get("step") or 0 for m in train_lines), default=0)
    lines = [m for m in train_lines if (m.get("step") or 0) > last / 2
             and _finite(m.get("noise/trace")) is not None and _finite(m.get("noise/grad_sq")) is not None]
    # samples per loss unit (e.g. 1/5 at 5 masked tokens a sequence): b_simple = trace / grad_sq x that
    per_unit = [m["noise/b_simple"] * m["noise/grad_sq"] / m["noise/trace"] for m in lines
                if _finite(m.get("noise/b_simple")) is not None and m["noise/trace"]]
    if not lines or not per_unit:
        return None
    grad_sq = sum(m["noise/grad_sq"] for m in lines) / len(lines)
    trace = sum(m["noise/trace"] for m in lines) / len(lines)
    return trace / grad_sq * (sum(per_unit) / len(per_unit)) if grad_sq > 0 else None


def to_target(points: list[dict], target: float) -> dict | None:
    """Where the eval loss first reaches ``target`` (loss <= target): {"steps", "samples"} linearly interpolated
    between the two eval points that bracket the crossing (the last one above the target and the first one at
    or below it), as in Shallue et al. 2018's steps to result. When the first eval point is already at or below
    it, that point is returned (nothing earlier to interpolate from; ``first_point`` True). None: never reached."""
    for i, p in enumerate(points):
        if p["loss"] > target:
            continue
        if i == 0:
            return {"steps": float(p["step"]), "samples": float(p["samples"]), "first_point": True}
        q = points[i - 1]
        t = (q["loss"] - target) / (q["loss"] - p["loss"])
        return {"steps": q["step"] + t * (p["step"] - q["step"]),
                "samples": q["samples"] + t * (p["samples"] - q["samples"]), "first_point": False}
    return None


def _status(recorded: dict | None, summary: dict | None) -> str:
    """ok | failed | interrupted | running | incomplete (see the module's docstring)."""
    if recorded is None:  # no status.json: an older trainer, whose summary.json came last
        return "ok" if summary is not None else "incomplete"
    said = recorded.get("status")
    if said == "finished":
        return "ok" if summary is not None else "incomplete"
    return said if said in ("failed", "interrupted", "running") else "incomplete"


def _unfinished_note(run_dir: Path, status: str, recorded: dict | None, summary: dict | None, last: dict,
                     planned_steps, has_plan: bool) -> str:
    step = (recorded or {}).get("step", last.get("step"))
    where = "" if step is None else f" at step {step}" + (f" of {planned_steps}" if planned_steps else "")
    error = (recorded or {}).get("error")
    if status == "failed":
        reason = " ".join(str(error or _last_error_line(run_dir) or "no error recorded").split())
        return f"failed{where}: {reason[:300]}"
    if status == "interrupted":
        return f"interrupted{where}" + (f" ({error})" if error else "") + "; continue it with resume=auto"
    if status == "running":
        return (f"status.json says running (still running, or killed without a chance to record it); last "
                f"logged step {last.get('step')} of {planned_steps}")
    if recorded is not None and recorded.get("status") == "finished" and summary is None:
        return "status.json says finished but summary.json is missing"
    if recorded is not None:
        return f"status.json holds an unknown status {recorded.get('status')!r}"
    return _incomplete_note(run_dir, last, planned_steps, has_plan)


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


def _stages_from_config(cfg: dict) -> list[dict]:
    """Stage batches and lengths as configured, for runs that died before writing plan.json."""
    batch, seq_len = _get(cfg, "batch"), _get(cfg, "data.seq_len")
    stages = _get(cfg, "stages") or []
    if not stages:
        return [{"batch": batch, "seq_len": seq_len}] if batch is not None else []
    return [{"batch": s.get("batch") or batch, "seq_len": s.get("seq_len") or seq_len} for s in stages]


def _get(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def display_path(path: Path) -> str:
    """Relative to the enclosing git checkout when there is one, else absolute."""
    path = Path(path).resolve()
    for parent in path.parents:
        if (parent / ".git").exists():
            return str(path.relative_to(parent))
    return str(path)


def user_command(line: str) -> str:
    """A recorded command (env.json) as a user types it: the entry point's name, without the machine's run
    folder."""
    program, *args = line.split()
    return " ".join([Path(program).name, *(a for a in args if not a.startswith("hydra.run.dir="))])
