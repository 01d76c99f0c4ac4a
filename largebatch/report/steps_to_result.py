"""Steps to result with ``stop_at``: a ladder's runs trained again to end at the target, and what that saved.

Shallue et al.'s steps to result read only a run's first evaluation that strictly beats the target; the rest
of its budget buys nothing for that number. The study trains a ladder's runs again with ``stop_at`` at the
target (:func:`stop_value`), so each one ends there, and sets each beside its full run (same config and seed,
the whole budget). The trainer is deterministic, so both must reach the target at the same step; the steps
and wall seconds the stopped run did not train are what the study saved.

Input: one entry per run, ``{"row", "batch", "seed", "dir": the stopped run, "full": the full run}``.
Output: ``steps_to_result.md`` and ``steps_to_result.json`` (:func:`write`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from largebatch import protocol as P
from largebatch.fileio import atomic_write_json, atomic_write_text
from largebatch.report import ladder as L
from largebatch.report.text import fmt, table
from largebatch.runfolder import SUMMARY, read_json, read_plan


def stop_value(target: float, higher_is_better: bool) -> float:
    """The ``stop_at`` that ends a run where Shallue's steps to result count. The trainer stops at a value
    that reaches its ``stop_at`` (>= or <=); steps to result need one that strictly beats the target. The
    next float past the target turns the first into the second."""
    return math.nextafter(target, math.inf if higher_is_better else -math.inf)


@dataclass(frozen=True)
class Saving:
    """What a run (or a sum of runs) did not train of its full budget: steps against the planned steps,
    wall seconds against the full run's."""

    planned_steps: int
    trained_steps: int
    full_s: float | None = None  # the full run's wall seconds (None: not timed)
    trained_s: float | None = None  # the stopped run's

    @property
    def steps(self) -> int:
        return self.planned_steps - self.trained_steps

    @property
    def steps_fraction(self) -> float | None:
        return self.steps / self.planned_steps if self.planned_steps else None

    @property
    def seconds(self) -> float | None:
        if self.full_s is None or self.trained_s is None:
            return None
        return self.full_s - self.trained_s if self.steps else 0.0  # all steps trained: any gap is the clocks' noise

    @property
    def seconds_fraction(self) -> float | None:
        return self.seconds / self.full_s if self.seconds is not None and self.full_s else None

    def steps_text(self) -> str:
        return f"{self.steps} of {self.planned_steps}" + _percent(self.steps_fraction)

    def seconds_text(self) -> str:
        if self.seconds is None:
            return "—"
        return f"{self.seconds:.1f} of {self.full_s:.1f} s" + _percent(self.seconds_fraction)


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f" ({round(100 * fraction)}%)"


def total(savings: list[Saving]) -> Saving:
    """The sum over runs: every run's steps; the seconds of the runs timed both ways."""
    timed = [s for s in savings if s.seconds is not None]
    full_s = sum(s.full_s for s in timed) if timed else None
    return Saving(sum(s.planned_steps for s in savings), sum(s.trained_steps for s in savings), full_s,
                  full_s - sum(s.seconds for s in timed) if timed else None)


@dataclass
class StoppedRun:
    """One stopped run beside its full run."""

    row: str
    batch: int
    seed: int
    reached: bool
    step: int | None  # at the evaluation that reached the target (None: never)
    samples: int | None
    seconds: float | None
    full_step: int | None  # the full run's steps to result (same config and seed)
    saving: Saving

    @property
    def agrees(self) -> bool:
        return self.step == self.full_step


def load(entries: list[dict], select_key: str, target: float, higher_is_better: bool) -> list[StoppedRun]:
    """The finished stopped runs of ``entries`` (a run that diverged or did not finish is left out)."""
    out = []
    for e in entries:
        summary = read_json(Path(e["dir"]) / SUMMARY)
        if not isinstance(summary, dict) or "stop_at" not in summary:
            continue
        stop = summary["stop_at"]
        full = L.load([{**e, "dir": e["full"]}], select_key, select_key)[0]
        hit = P.steps_to_result(full.select, target, higher_is_better) if full.status == "ok" else None
        planned = sum(stage["total_steps"] for stage in read_plan(Path(e["dir"])))
        saving = Saving(planned, summary["steps"], full.wall_time_s if full.status == "ok" else None,
                        summary.get("wall_time_s"))
        out.append(StoppedRun(e["row"], int(e["batch"]), int(e["seed"]), bool(stop.get("reached")), stop.get("step"),
                              stop.get("samples"), stop.get("wall_time_s"), hit and hit["step"], saving))
    return out


def render(runs: list[StoppedRun], *, title: str, metric: str, target: float, names: dict[str, str]) -> str:
    """The markdown: the savings first, then whether each run agrees with its full run, then one row a run."""
    whole = total([r.saving for r in runs])
    reached = sum(r.reached for r in runs)
    disagree = [r for r in runs if not r.agrees]
    lines = [f"# {title}", "",
             f"Every run below is a ladder run trained again with `stop_at` on validation {metric}: it ends at the "
             f"first evaluation that strictly beats {target:.4g}, the base rung's mean final value over its fresh seeds "
             "(the strictest target of table.md's steps to result), where its full run trains its whole budget.", "",
             f"- **Saved: {whole.steps_text()} planned steps, {whole.seconds_text()} of wall time**, over {len(runs)} "
             f"runs; {reached} of them reached the target.",
             "- " + (f"Every run stopped where its full run (same config and seed) first beats the target ({len(runs)} "
                     "of them, the runs that never reach it included)." if not disagree else
                     f"{len(disagree)} of {len(runs)} runs did NOT stop where their full run first beats the target: "
                     + "; ".join(f"{names.get(r.row, r.row)} {r.batch} seed {r.seed} ({fmt(r.step)} against "
                                 f"{fmt(r.full_step)})" for r in disagree) + "."),
             "- A rung's steps to result is the fewest over its seeds (Shallue et al.). Seconds saved: the full "
             "run's wall time less the stopped run's, as measured (the machine's load included; none for a run "
             "that trained its whole budget).", ""]
    body = [[names.get(r.row, r.row), r.batch, r.seed, fmt(r.step) if r.reached else "never", fmt(r.samples),
             fmt(r.seconds, 3), fmt(r.full_step) if r.full_step is not None else "never", r.saving.steps_text(),
             r.saving.seconds_text()] for r in runs]
    body.append(["**total**", "", "", "", "", "", "", whole.steps_text(), whole.seconds_text()])
    lines += table(["rule", "batch", "seed", "steps to target", "samples", "seconds", "full run's steps to result",
                    "steps saved (of planned)", "seconds saved (of the full run's)"], body)
    return "\n".join(lines) + "\n"


def write(entries: list[dict], out_dir: Path, *, title: str, select_key: str, target: float, higher_is_better: bool,
          names: dict[str, str] | None = None) -> dict:
    """Write ``steps_to_result.md`` and ``.json`` into ``out_dir``; returns {"files", "runs", "total"}."""
    runs = load(entries, select_key, target, higher_is_better)
    whole = total([r.saving for r in runs])
    files = {"steps_to_result.md": Path(out_dir) / "steps_to_result.md",
             "steps_to_result.json": Path(out_dir) / "steps_to_result.json"}
    atomic_write_text(files["steps_to_result.md"], render(runs, title=title, metric=select_key, target=target,
                                                          names=names or {}))

    def record(saving: Saving) -> dict:
        return {**asdict(saving), "steps_saved": saving.steps, "steps_saved_fraction": saving.steps_fraction,
                "seconds_saved": saving.seconds, "seconds_saved_fraction": saving.seconds_fraction}

    atomic_write_json(files["steps_to_result.json"], {
        "metric": select_key, "target": target, "stop_at": stop_value(target, higher_is_better),
        "higher_is_better": higher_is_better, "total": record(whole),
        "runs": [{**{k: v for k, v in asdict(r).items() if k != "saving"}, "agrees": r.agrees,
                  "saving": record(r.saving)} for r in runs]})
    return {"files": files, "runs": runs, "total": whole}
