"""The LEGW table (arXiv 1901.08256): does a scaling rule hold the base batch's metric up a batch ladder?

Input: one entry per run, ``{"row", "batch", "seed", "dir"[, "record", "trial"]}`` (scripts/reproduce_legw.py
writes them). Rows: "base" (the target: the chosen base config on fresh seeds; every rule is the identity at
k = 1, so it is shared by all rules), the rules "legw", "sqrt", "linear", "none", and "tuned" (the oracle:
its trials carry ``trial`` and only select; its cells are the chosen trial re-run on the declared seeds).
Output, in one folder: ``runs.csv``, ``table.md``, ``metric_vs_batch.png``, ``steps_to_target.png`` and
``provenance.json``. Every number is computed by the protocol (largebatch/report/ladder.py,
largebatch/protocol.py, docs/protocol.md) from the run folders.
"""

from __future__ import annotations

from pathlib import Path

from largebatch import protocol as P
from largebatch.fileio import atomic_write_json, atomic_write_text
from largebatch.report import ladder as L
from largebatch.report.plots import plot_ladder_metric, plot_ladder_steps
from largebatch.report.text import write_csv

RULE_ORDER = ("legw", "sqrt", "linear", "none", "tuned")
RULE_NAMES = {"legw": "sqrt + LEGW", "sqrt": "sqrt (no LEGW)", "linear": "linear (Goyal)", "none": "none",
              "tuned": "tuned (oracle)"}
RULE_STYLE = {"legw": ("-", "o"), "sqrt": ("--", "s"), "linear": ("-.", "^"), "none": (":", "v"), "tuned": ("-", "*")}
COLUMNS = ["row", "batch", "seed", "trial", "status", "select", "report", "peak_lr", "warmup_epochs", "steps",
           "wall_time_s", "note", "run"]


def _rows(runs: list[L.Run]) -> list[str]:
    return [r for r in RULE_ORDER if any(x.row == r for x in runs)]


def statements(runs, spec: L.Spec, assessed: dict, base: int, top_of: dict[str, int], warmup_epochs,
               tuning: str | None, metric: str, fresh_target: bool = True) -> list[str]:
    """The headline first: each rule's reach by the interval verdicts, then the target and the caveats."""
    target = assessed["targets"].get("*") or []
    if not target:
        return [f"No base run finished with a finite {metric}: there is no target, so nothing can be said."]
    ci = P.t_interval(target)
    out = []
    reach = {}
    for rule in [r for r in _rows(runs) if r != "base"]:
        reach[rule] = L.reach_of(assessed, rule, base)
        out.append(L.reach_text(RULE_NAMES.get(rule, rule), *reach[rule], base, top_of[rule]) + ".")
    out.append(f"Target: {metric} {ci.text()} (95% t interval) at the base batch {base}, from {ci.n} seed(s)"
               + (" the sweep never ran" if fresh_target else ", one of them the sweep's winning run")
               + f"; margin {spec.margin:.1%} of it ({spec.margin_at(ci.mean):.3g}). A rung holds when "
               "the whole interval of its gap to the target lies within the margin (better counts), fails when it "
               "lies wholly beyond, else it is unresolved.")
    if spec.baseline is not None:
        ok = P.beats_baseline(target, spec.baseline, spec.higher_is_better)
        out.append(f"The base {'beats' if ok else 'does NOT beat'} the {spec.baseline_name} ({spec.baseline:.4g})"
                   + ("." if ok else ": no verdict of this table means anything."))
    legw = reach.get("legw")
    if legw is not None:
        top = top_of["legw"]
        others = {r: v for r, v in reach.items() if r not in ("legw", "tuned")}
        if legw[0] == top:
            beaten = [RULE_NAMES[r] for r, v in others.items() if v[1] < top_of[r]]
            out.append(f"LEGW's claim shows: sqrt + LEGW holds to {top / base:g}x"
                       + (f", where {', '.join(beaten)} fail(s) before the top." if beaten else
                          "; no other rule is shown to fail, so the rules are not separated."))
        elif legw[1] < top:
            out.append(f"LEGW's claim does not show at this budget: sqrt + LEGW fails above batch {legw[1]}.")
        else:
            out.append(f"LEGW's claim is unresolved at this budget: sqrt + LEGW neither holds nor fails up to batch "
                       f"{top} within the seeds run (each cell says how many seeds would resolve it).")
    if "tuned" in reach:
        out.append(f"The tuned row ({tuning}) is what any rule could reach at this budget: where it fails too, the "
                   "budget, not the scaling rule, is what fails.")
    if warmup_epochs == 0:
        out.append("The base warmup is 0 epochs, so LEGW's warmup (k x 0) is none: 'sqrt + LEGW' is 'sqrt' (run once).")
    return out


def epochs_to_target(runs: list[L.Run], spec: L.Spec, target: float, base: int, top_of: dict[str, int]) -> str:
    """Epochs to the strictest validation target (the first evaluation that beats it, the fewest over a rung's
    seeds): the base against each rule's top rung; at a fixed epoch budget, perfect scaling keeps them equal."""
    def epochs(row: str, batch: int) -> float | None:
        hits = [h["epoch"] for r in runs if r.row == row and r.batch == batch and not r.trial
                and (h := P.steps_to_result(r.select, target, spec.higher_is_better)) and h.get("epoch") is not None]
        return min(hits) if hits else None

    parts = [f"{RULE_NAMES.get(rule, rule)} at {top}: " + (f"{e:.3g}" if (e := epochs(rule, top)) else "never")
             for rule, top in top_of.items()]
    at_base = epochs("base", base)
    return (f"Epochs to the validation target {target:.4g}: {at_base:.3g} at the base batch" if at_base else
            f"The base never beats the validation target {target:.4g}") + "; " + "; ".join(parts) + \
        " (equal epochs would be perfect scaling)."


def write_runs_csv(runs: list[L.Run], spec: L.Spec, path: Path) -> Path:
    return write_csv([{"row": r.row, "batch": r.batch, "seed": r.seed, "trial": r.trial, "status": r.status,
                       "select": L.value(r, "select", None, spec.last), "report": L.value(r, "report", None, spec.last),
                       "peak_lr": r.peak_lr, "warmup_epochs": r.warmup_epochs, "steps": r.steps,
                       "wall_time_s": r.wall_time_s, "note": r.note, "run": r.record} for r in runs], COLUMNS, path)


def render(runs, spec: L.Spec, by_budget: list[dict], *, title: str, claim: str, lines: list[str], base: int,
           steps: dict, targets: list[float], fits: dict, tuning: str | None, protocol_notes: list[str]) -> str:
    rows = [r for r in _rows(runs) if r != "base"]
    out = [f"# {title}", "", f"Paper's claim: {claim}.", "", "## What the runs show", ""]
    out += [f"- {s}" for s in lines]
    if protocol_notes:
        out += ["", "## Protocol caveats", "", *(f"- {n}" for n in protocol_notes)]
    out += ["", f"## {spec.report_key} per batch and rule", "",
            "Mean [95% t interval] over seeds; ✓ holds, ✗ fails, ? unresolved (with the seeds per cell that would "
            "resolve it), by the interval of the gap to the target against the margin. The base rung is the target, "
            "shared by every rule." + (f" Accuracy-type metrics: the mean of the last {spec.last} evaluations."
                                       if spec.last > 1 else ""), ""]
    extra = {"tuned": tuning} if tuning else None
    for assessed in by_budget:
        out += L.cells_section(assessed, rows, RULE_NAMES, spec.report_key, base, extra)
    out += ["## Steps to result and the critical batch", ""]
    out += L.steps_section(steps, targets, rows, RULE_NAMES, spec.select_key, ("base", base))
    out += L.noise_section(L.noise_by_batch([r for r in runs if not r.trial]), fits)
    out += ["## Every run", ""]
    out += L.table(["row", "batch", "seed", "trial", "status", spec.select_key, spec.report_key, "peak lr",
                    "warmup epochs", "steps", "note"],
                   [[r.row, r.batch, r.seed, "yes" if r.trial else "", r.status,
                     L.fmt(L.value(r, "select", None, spec.last)), L.fmt(L.value(r, "report", None, spec.last)),
                     L.fmt(r.peak_lr), L.fmt(r.warmup_epochs), r.steps, r.note] for r in runs])
    return "\n".join(out) + "\n"


def plot_metric_vs_batch(assessed: dict, rows: list[str], base: int, spec: L.Spec, path: Path) -> Path:
    """Each rule's cells (mean, 95% interval) against the batch, from the shared base rung."""
    cells = sorted(assessed["cells"].items(), key=lambda kv: kv[0][1])
    series = {RULE_NAMES.get(rule, rule): [(b, i.mean, i.mean if i.lo is None else i.lo, i.mean if i.hi is None else i.hi)
                                           for (r, b), c in cells if (r == rule or (r, b) == ("base", base))
                                           and (i := c.interval) is not None] for rule in rows}
    target = assessed["cells"].get(("base", base))
    t = target.interval.mean if target is not None and target.interval is not None else None
    return plot_ladder_metric(series, path, metric=spec.report_key,
                              title=f"{spec.report_key} at {L.budget_name(assessed['budget'])} (95% intervals)",
                              target=t, margin=spec.margin_at(t) if t is not None else None,
                              baseline=(spec.baseline, spec.baseline_name) if spec.baseline is not None else None,
                              styles={RULE_NAMES.get(r, r): style for r, style in RULE_STYLE.items()})


def write_legw_report(entries: list[dict], out_dir: Path, *, task: str, spec: L.Spec, title: str = "LEGW at reduced scale",
                      claim: str = "", provenance: dict | None = None, tuning: str | None = None,
                      protocol_notes: list[str] = (), fresh_target: bool = True) -> dict:
    """Write the LEGW report of ``entries`` into ``out_dir``; returns {"files", "reach", "statements"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = L.load(entries, spec.select_key, spec.report_key)
    base_runs = [r for r in runs if r.row == "base" and not r.trial]
    base = min(r.batch for r in base_runs)
    rows = [r for r in _rows(runs) if r != "base"]
    top_of = {rule: max(r.batch for r in runs if r.row == rule) for rule in rows}
    by_budget = [L.assess(runs, spec, b, {"*": base_runs}) for b in spec.budgets]
    main = by_budget[-1]
    targets = L.step_targets(spec, base_runs)
    steps = L.steps_table(runs, spec, targets)
    fit_row = "tuned" if any(r == "tuned" for r, _ in steps) else "legw"  # with the base rung: >= 2 points
    fits = {RULE_NAMES[fit_row]: L.fit(steps, fit_row, len(targets) - 1, ("base", base))} if targets else {}
    warmups = {r.warmup_epochs for r in base_runs if r.warmup_epochs is not None}
    lines = statements(runs, spec, main, base, top_of, warmups.pop() if len(warmups) == 1 else None, tuning,
                       spec.report_key, fresh_target)
    if targets:
        lines.append(epochs_to_target(runs, spec, targets[-1], base, top_of))
    files = {"runs.csv": write_runs_csv(runs, spec, out_dir / "runs.csv")}
    text = render(runs, spec, by_budget, title=title, claim=claim, lines=lines, base=base, steps=steps,
                  targets=targets, fits=fits, tuning=tuning, protocol_notes=list(protocol_notes))
    files["table.md"] = out_dir / "table.md"
    atomic_write_text(files["table.md"], text)
    files["metric_vs_batch.png"] = plot_metric_vs_batch(main, rows, base, spec, out_dir / "metric_vs_batch.png")
    curves = {RULE_NAMES.get(rule, rule): {b: s[-1] for (r, b), s in steps.items()
                                           if (r == rule or (r, b) == ("base", base)) and s and s[-1]}
              for rule in rows}
    noise = L.noise_by_batch([r for r in runs if not r.trial])
    files["steps_to_target.png"] = plot_ladder_steps(curves, fits, L.late_noise(noise), out_dir / "steps_to_target.png",
                                                     base=base, ladder=list(noise))
    reach = {rule: L.reach_of(main, rule, base) for rule in rows}
    atomic_write_json(out_dir / "provenance.json", {
        **(provenance or {}), "task": task, "select_metric": spec.select_key, "report_metric": spec.report_key,
        "higher_is_better": spec.higher_is_better, "margin_relative": spec.margin, "last_evals": spec.last,
        "budgets_epochs": list(spec.budgets), "target": P.t_interval(main["targets"]["*"]).mean
        if main["targets"]["*"] else None, "base_batch": base,
        "reach": {rule: {"holds_to": r[0], "not_failed_to": r[1]} for rule, r in reach.items()},
        "critical_batch_fit": {k: vars(f) if f else None for k, f in fits.items()},
        "protocol_notes": list(protocol_notes), "runs": [r.record for r in runs]})
    files["provenance.json"] = out_dir / "provenance.json"
    return {"files": files, "reach": reach, "statements": lines}
