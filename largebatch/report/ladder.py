"""A batch ladder judged by the protocol (largebatch/protocol.py, docs/protocol.md): the one report
toolkit both drivers' tables use for their verdicts.

A ladder is a set of rows (scaling rules for LEGW, optimizers for LAMB's Table 1), each with rungs (batch
sizes) of runs (seeds), and a target per row: the runs of the chosen base config on fresh seeds. Every run
contributes two curves from its ``metrics.jsonl``: the selection metric (validation, ``eval/...``) and the
reported metric (test, ``test/...``; the same curve where a task has no test split at every evaluation).

:func:`assess` turns them into cells (mean and 95% t interval of the reported metric at an epoch budget),
verdicts against the row's target (holds / fails / unresolved with the seeds that would resolve it), steps
to result on the validation curves for several targets, the McCandlish fit and B_simple by quarter of
training. :func:`render` writes the markdown sections; the drivers' own reports add their paper's sentences.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from largebatch import protocol as P
from largebatch.report.plots import plot_ladder_steps
from largebatch.report.runs import load_run
from largebatch.report.text import fmt, table
from largebatch.runfolder import read_metrics, read_plan


@dataclass
class Run:
    row: str
    batch: int
    seed: int | None
    status: str
    record: str
    select: list[dict]  # validation curve: {"step", "samples", "epoch", "value"}
    report: list[dict]  # test curve (the validation one where the run logged no test metric)
    peak_lr: float | None = None
    warmup_epochs: float | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    note: str = ""
    trial: bool = False  # a tuning trial (selection only), not a seed of a chosen config
    target: bool = False  # one of its row's target runs (the base config on fresh seeds)
    b_simple: list = field(default_factory=list)  # by quarter of the run


def _curve(metrics: list[dict], key: str, steps_per_epoch: int | None) -> list[dict]:
    points = {}
    for m in metrics:
        v = m.get(key)
        if "loss" in m or m.get("samples") is None or not isinstance(v, (int, float)):
            continue
        points[m["samples"]] = {"step": m.get("step"), "samples": m["samples"], "epoch": m.get("epoch") or (
                                    m["step"] / steps_per_epoch if steps_per_epoch and m.get("step") else None),
                                "value": v if math.isfinite(v) else None}
    return [points[k] for k in sorted(points)]


def load(entries: list[dict], select_key: str, report_key: str) -> list[Run]:
    """One :class:`Run` per entry ``{"row", "batch", "seed", "dir"[, "record", "trial"]}``."""
    runs = []
    for e in entries:
        info = load_run(Path(e["dir"]))
        metrics = read_metrics(Path(e["dir"]))
        plan = (read_plan(Path(e["dir"])) or [{}])[-1]
        ok = info["status"] == "ok"
        per_epoch = plan.get("steps_per_epoch")
        select = _curve(metrics, select_key, per_epoch) if ok else []
        report = _curve(metrics, report_key, per_epoch) if ok else []
        runs.append(Run(row=e["row"], batch=int(e["batch"]), seed=e.get("seed"), status=info["status"],
                        record=str(e.get("record") or e["dir"]), select=select, report=report or select,
                        peak_lr=plan.get("lr"), warmup_epochs=plan.get("warmup_epochs"), steps=info["steps"],
                        wall_time_s=info["wall_time_s"], note=info["note"], trial=bool(e.get("trial")),
                        target=bool(e.get("target")),
                        b_simple=P.noise_scale_by_part([m for m in metrics if "loss" in m])))
    return runs


@dataclass
class Spec:
    """What a ladder's table is judged by."""

    select_key: str  # e.g. "eval/accuracy" (validation)
    report_key: str  # e.g. "test/accuracy"
    higher_is_better: bool
    margin: float  # the equivalence margin of a verdict: relative to the target's mean (or absolute, below)
    last: int = 1  # evaluations averaged at the end of a budget (3 for classification)
    budgets: tuple = (None,)  # epoch budgets read from the same runs; None: each run's end
    baseline: float | None = None  # the trivial baseline (unigram, majority class) in the reported metric
    baseline_name: str = "trivial baseline"
    step_targets: tuple = (2, 1, 0)  # steps-to-result targets: the validation target loosened by k margins
    absolute: bool = False  # the margin in the metric's units (nats), not relative

    def margin_at(self, target: float) -> float:
        return self.margin if self.absolute else self.margin * abs(target)


def value_of(metrics: list[dict], key: str, last: int = 1) -> float | None:
    """A run's final ``key`` from its metrics lines (the mean of its last ``last`` evaluations)."""
    return P.final_value([{"value": m[key]} for m in metrics if isinstance(m.get(key), (int, float)) and "loss" not in m],
                         last)


def value(run: Run, curve: str, budget: float | None, last: int) -> float | None:
    points = getattr(run, curve)
    if run.status != "ok":
        return None
    if budget is None:
        return P.final_value(points, last)
    return P.metric_at_budget(points, budget, last)


def values(runs: list[Run], curve: str, budget, last: int) -> list[float]:
    return P.finite(value(r, curve, budget, last) for r in runs)


@dataclass
class Cell:
    row: str
    batch: int
    runs: list[Run]
    interval: P.Interval | None
    verdict: P.Verdict | None  # None for the target itself
    below_baseline: bool = False


def assess(runs: list[Run], spec: Spec, budget: float | None, targets: dict[str, list[Run]]) -> dict:
    """Cells and verdicts at one budget. ``targets``: {row: its target runs}; a row without one borrows the
    "*" entry (LEGW: every rule shares the base). Trials are left out of cells (they only select)."""
    cells: dict[tuple[str, int], Cell] = {}
    seeds = [r for r in runs if not r.trial]
    for row in dict.fromkeys(r.row for r in seeds):
        target_runs = targets.get(row, targets.get("*", []))
        target = values(target_runs, "report", budget, spec.last)
        mean = statistics.fmean(target) if target else None
        for batch in sorted({r.batch for r in seeds if r.row == row}):
            rung = [r for r in seeds if r.row == row and r.batch == batch]
            v = values(rung, "report", budget, spec.last)
            is_target = sorted(r.record for r in rung) == sorted(r.record for r in target_runs)
            verdict = None if is_target or mean is None else P.verdict(v, target, spec.margin_at(mean),
                                                                         spec.higher_is_better)
            below = spec.baseline is not None and bool(v) and not P.beats_baseline(v, spec.baseline,
                                                                                   spec.higher_is_better)
            cells[row, batch] = Cell(row, batch, rung, P.t_interval(v), verdict, below)
    target_values = {row: values(t, "report", budget, spec.last) for row, t in targets.items()}
    return {"cells": cells, "targets": target_values, "budget": budget}


def reach_of(assessed: dict, row: str, base_batch: int) -> tuple[int, int]:
    verdicts = [(b, c.verdict) for (r, b), c in assessed["cells"].items() if r == row and c.verdict is not None]
    return P.reach(verdicts, base_batch)


def reach_text(name: str, proven: int, possible: int, base: int, top: int) -> str:
    """A row's reach in words: how far it holds, where it is unresolved, where it fails."""
    k = lambda b: f"{b / base:g}x"  # noqa: E731
    if proven == top:
        return f"**{name}** holds at every rung, to batch {top} ({k(top)})"
    if proven == possible:
        return (f"**{name}** fails at the first rung above the base" if proven == base else
                f"**{name}** holds to batch {proven} ({k(proven)}) and fails above it")
    text = f"**{name}** holds to batch {proven} ({k(proven)})" if proven > base else f"**{name}** holds at no rung above the base"
    return text + (f"; unresolved up to {possible} ({k(possible)})" + ("" if possible == top else ", fails above"))


# ---------------------------------------------------------------------- steps to result and the fit


def step_targets(spec: Spec, target_runs: list[Run]) -> list[float]:
    """The validation targets of the steps-to-result table: the target runs' mean final validation metric,
    loosened by k margins for each k of ``spec.step_targets`` (the strictest last)."""
    v = values(target_runs, "select", None, spec.last)
    if not v:
        return []
    mean = statistics.fmean(v)
    sign = -1.0 if spec.higher_is_better else 1.0
    return [mean + sign * k * spec.margin_at(mean) for k in spec.step_targets]


def steps_table(runs: list[Run], spec: Spec, targets: list[float]) -> dict[tuple[str, int], list[float | None]]:
    """{(row, batch): [fewest steps to each target over the rung's runs, trials included]} (Shallue et al.)."""
    out = {}
    for key in dict.fromkeys((r.row, r.batch) for r in runs):
        rung = [r for r in runs if (r.row, r.batch) == key and r.status == "ok"]
        out[key] = [P.min_steps_to_result([r.select for r in rung], t, spec.higher_is_better) for t in targets]
    return out


def fit(steps: dict, row: str, index: int, base: tuple[str, int] | None = None) -> P.CriticalBatchFit | None:
    """McCandlish's fit to ``row``'s steps to target ``index`` (with the shared base rung ``base``)."""
    pts = {b: s[index] for (r, b), s in steps.items() if r == row and s[index] is not None}
    if base is not None and base in steps and steps[base][index] is not None:
        pts.setdefault(base[1], steps[base][index])
    return P.fit_critical_batch(list(pts), list(pts.values()))


def late_noise(noise: dict[int, list]) -> list[float]:
    """B_simple of the last quarter of training, one value a rung (where one was measured)."""
    return P.finite(q[-1] for q in noise.values() if q)


def noise_by_batch(runs: list[Run]) -> dict[int, list[float | None]]:
    """Per batch, the median over its runs of B_simple in each quarter of training."""
    out = {}
    for batch in sorted({r.batch for r in runs}):
        quarters = [r.b_simple for r in runs if r.batch == batch and r.status == "ok" and r.b_simple]
        out[batch] = [statistics.median(v) if (v := P.finite(q[i] for q in quarters)) else None for i in range(4)]
    return out


# ---------------------------------------------------------------------- markdown


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.interval is None:
        return "— (no finished seed) ✗"
    text = cell.interval.text()
    if cell.verdict is None:
        text += " (target)"
    else:
        text += f" {cell.verdict.mark}" + ("" if cell.verdict.word in ("holds", "fails")
                                           else f" {cell.verdict.text()}")
    return text + (" ⚠ not above the baseline" if cell.below_baseline else "")


def budget_name(budget) -> str:
    return "each run's end" if budget is None else f"{budget:g} epochs"


def cells_section(assessed: dict, rows: list[str], names: dict[str, str], metric: str, base_batch: int,
                  extra: dict[str, str] | None = None) -> list[str]:
    batches = sorted({b for _, b in assessed["cells"]})
    cells = assessed["cells"]  # a row's base rung may be a shared one ("base", as in LEGW)
    body = [[b, f"{b / base_batch:g}", *(cell_text(cells.get((row, b)) or cells.get(("base", b))) for row in rows)]
            for b in batches]
    headers = ["batch", "k", *(names.get(r, r) + (f" ({extra[r]})" if extra and r in extra else "") for r in rows)]
    return [f"### {metric} at {budget_name(assessed['budget'])}", "", *table(headers, body), ""]


def steps_section(steps: dict, targets: list[float], rows: list[str], names: dict[str, str], metric: str,
                  base: tuple[str, int] | None) -> list[str]:
    if not targets:
        return []
    batches = sorted({b for _, b in steps})
    headers = ["batch", *(f"{names.get(r, r)}: " + " / ".join(f"{t:.4g}" for t in targets) for r in rows)]
    body = []
    for b in batches:
        row_cells = []
        for r in rows:
            s = steps.get((r, b)) or (steps.get(base) if base and b == base[1] else None)
            row_cells.append("" if s is None else " / ".join(fmt(x) for x in s))
        body.append([b, *row_cells])
    return [f"Steps to result (Shallue et al.: the first evaluation whose validation {metric} strictly beats the "
            "target, the fewest over the rung's runs and trials; — never) for the targets "
            + ", ".join(f"{t:.4g}" for t in targets) + " (the strictest last):", "", *table(headers, body), ""]


def noise_text(x) -> str:
    """One B_simple estimate: a value at or below 0 is the estimator's noise (the two batch sizes' gradient
    norms did not separate), not a noise scale."""
    return "≤ 0 (noise)" if isinstance(x, (int, float)) and math.isfinite(x) and x <= 0 else fmt(x, 3)


def noise_section(noise: dict[int, list], fits: dict[str, P.CriticalBatchFit | None]) -> list[str]:
    lines = ["Gradient noise scale B_simple (McCandlish et al.) by quarter of each run's steps, the median over the "
             "rung's runs, in samples (—: no estimate in that quarter, too few log steps):", ""]
    lines += table(["batch", "Q1", "Q2", "Q3", "Q4"], [[b, *(noise_text(x) for x in q)] for b, q in noise.items()])
    lines.append("")
    if noise:
        base = min(noise)
        last = next((x for x in reversed(noise[base]) if x is not None), None)
        if last is not None and last > 0:
            above = [b for b in noise if b > last]
            lines.append(f"- The base rung's B_simple late in training is {fmt(last, 3)} samples: "
                         + (f"the rungs {', '.join(map(str, above))} sit above it, where doubling the batch no "
                            "longer halves the steps a target needs (McCandlish et al.)." if above else
                            "every rung sits below it.")
                         )
        elif last is not None:
            lines.append("- The base rung's late B_simple is not resolved (an estimate at or below 0): this "
                         "workload's noise scale is unknown at this budget.")
    for name, f in fits.items():
        lines.append(f"- McCandlish fit `steps = S_min (1 + B_crit / B)` to {name}: "
                     + (f.text() if f else "no fit (fewer than two rungs reached the target, or no curve of that "
                        "shape: more steps at the larger batches)") + ".")
    return [*lines, ""]


def rows_section(entries: list[dict], spec: Spec, *, names: dict[str, str] | None = None,
                 tunings: dict[str, str] | None = None, fit_rows: tuple[str, ...] = (),
                 plot: Path | None = None) -> tuple[list[str], dict]:
    """The protocol's section for a ladder whose rows each have their own target (LAMB's Table 1: a row per
    optimizer, its base rung on fresh seeds the target; a tuned row lists its optimizer's target runs again).
    Entries as :func:`load` takes them, the target runs marked ``"target": True``. A row whose target does not
    beat ``spec.baseline`` is dropped from the verdicts, with the reason. Returns (markdown lines, record)."""
    names = names or {}
    runs = load(entries, spec.select_key, spec.report_key)
    rows = list(dict.fromkeys(r.row for r in runs))
    targets = {row: [r for r in runs if r.row == row and r.target] for row in rows}
    base_of = {row: min((r.batch for r in t), default=None) for row, t in targets.items()}
    by_budget = [assess(runs, spec, b, targets) for b in spec.budgets]
    main = by_budget[-1]
    lines, record, kept = [], {}, []
    for row in rows:
        name, base = names.get(row, row), base_of[row]
        target = main["targets"].get(row) or []
        top = max(r.batch for r in runs if r.row == row)
        if base is None or not target:
            lines.append(f"**{name}**: no finished target run, no verdict.")
            continue
        if spec.baseline is not None and not P.beats_baseline(target, spec.baseline, spec.higher_is_better):
            lines.append(f"**{name}** is dropped from the verdicts: its base rung ({spec.report_key} "
                         f"{P.t_interval(target).text()}) does not beat the {spec.baseline_name} ({spec.baseline:.4g}), "
                         "so it never trained and any comparison with it is vacuous.")
            record[row] = {"dropped": "does not beat the baseline"}
            continue
        kept.append(row)
        proven, possible = reach_of(main, row, base)
        record[row] = {"holds_to": proven, "not_failed_to": possible, "target": P.t_interval(target).mean}
        lines.append(reach_text(name + (f" ({tunings[row]})" if tunings and row in tunings else ""), proven,
                                possible, base, top) + f"; target {P.t_interval(target).text()} at batch {base}.")
    out = [*(f"- {line}" for line in lines), "",
           f"Cells: {spec.report_key}, mean [95% t interval]; ✓ holds, ✗ fails, ? unresolved (with the seeds per cell "
           f"that would resolve it), by the interval of the gap to the row's own target against the margin "
           f"({spec.margin:g}{'' if spec.absolute else ' relative'}).", ""]
    shown = [r for r in rows if base_of[r] is not None]
    labels = {r: names.get(r, r) + (f" ({tunings[r]})" if tunings and r in tunings else "")
              + ("" if r in kept else " (dropped: no verdict)") for r in shown}
    for assessed in by_budget:
        out += cells_section(assessed, shown, labels, spec.report_key, min(base_of[r] for r in shown) if shown else 1)
    fits, curves = {}, {}
    for row in [r for r in fit_rows if r in shown]:
        st = step_targets(spec, targets[row])
        steps = steps_table([r for r in runs if r.row == row], spec, st)
        out += steps_section(steps, st, [row], labels, spec.select_key, None)
        fits[labels[row]] = fit(steps, row, len(st) - 1) if st else None
        curves[labels[row]] = {b: s[-1] for (_, b), s in steps.items() if s and s[-1]}
    noise = noise_by_batch([r for r in runs if not r.trial])
    out += noise_section(noise, fits)
    if plot is not None:
        plot_ladder_steps(curves, fits, late_noise(noise), plot, ladder=list(noise), base=min(base_of[r] for r in shown) if shown else None)
        out += [f"![steps to result]({Path(plot).name})", ""]
    record["critical_batch_fit"] = {k: vars(f) if f else None for k, f in fits.items()}
    return out, record
