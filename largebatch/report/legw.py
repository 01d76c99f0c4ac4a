"""The LEGW table (arXiv 1901.08256): does a scaling rule hold the base batch's metric up a batch ladder?

Input: one entry per run, ``{"rule", "batch", "seed", "dir"}`` (scripts/reproduce_legw.py writes them; the
rule of the base rung is "base": every rule is the identity at k = 1, so its runs are shared by all rules).
Output, in one folder: ``runs.csv``, ``table.md``, ``metric_vs_batch.png``, ``steps_to_target.png`` and
``provenance.json``.

What the table computes, all from the run folders:

- the target: the base rung's primary metric, mean over its seeds;
- per rule and rung, the metric (mean ± sample std where there are two seeds or more) and whether it lies
  within the noise band of the target: band = max(tolerance x |target|, 2 x the pooled seed std of the base
  rung and that rung) (the idea of :func:`largebatch.report.summary.noise_band`); a rung better than the
  target counts as within. A rule "holds up to" the largest batch up to which every rung is within;
- steps (and an estimate of the wall time) to reach the target, from each run's eval curve with
  :func:`largebatch.report.runs.to_target` (linear interpolation between the eval points bracketing the first
  crossing; a higher-is-better metric is negated so "reaching" means at or above), against perfect scaling
  (the base's steps / k);
- sentences that say what the numbers show, including when they cannot show LEGW's effect, and why.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from largebatch.fileio import atomic_write_json, atomic_write_text
from largebatch.report.plots import save_figure
from largebatch.report.runs import load_run, read_json, read_metrics, to_target

RULE_ORDER = ("legw", "sqrt", "linear", "none")
RULE_NAMES = {"legw": "sqrt + LEGW", "sqrt": "sqrt (no LEGW)", "linear": "linear (Goyal)", "none": "none"}
# Line style and marker per rule: rules that coincide (legw = sqrt when the base warmup is 0) stay visible.
RULE_STYLE = {"legw": ("-", "o"), "sqrt": ("--", "s"), "linear": ("-.", "^"), "none": (":", "v")}
COLUMNS = ["rule", "batch", "k", "seed", "status", "metric", "peak_lr", "warmup_epochs", "warmup_steps", "steps",
           "samples", "steps_to_target", "samples_to_target", "time_to_target_s", "wall_time_s", "note", "run"]


@dataclass
class Rung:
    """The runs of one rule at one batch (its seeds)."""

    rule: str
    batch: int
    runs: list[dict] = field(default_factory=list)

    def values(self, key: str = "metric") -> list[float]:
        return [r[key] for r in self.runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    def mean(self, key: str = "metric") -> float | None:
        v = self.values(key)
        return statistics.fmean(v) if v else None

    def std(self, key: str = "metric") -> float | None:
        v = self.values(key)
        try:
            return statistics.stdev(v) if len(v) >= 2 else None
        except OverflowError:  # blown-up runs (perplexities of 1e89 and 1e206): no spread to speak of
            return None


def pooled_std(a: Rung, b: Rung) -> float | None:
    """The pooled sample std of two rungs' seeds (a single-seed rung adds nothing); None without seeds."""
    num = dof = 0.0
    try:
        for rung in (a, b):
            v = rung.values()
            if len(v) >= 2:
                num += (len(v) - 1) * statistics.variance(v)
                dof += len(v) - 1
    except OverflowError:  # blown-up runs: the band falls back to the tolerance
        return None
    return math.sqrt(num / dof) if dof else None


def load_rows(entries: list[dict], metric: str) -> list[dict]:
    """One row per run entry: its rule, batch, seed, the plan's lr and warmup, its final ``metric`` and eval
    curve ("_curve": {"step", "samples", "value"}), from the run folder's records."""
    rows = []
    for e in entries:
        run = load_run(Path(e["dir"]))
        plan = (read_json(Path(e["dir"]) / "plan.json") or [{}])[-1]
        summary = read_json(Path(e["dir"]) / "summary.json") or {}
        value = summary.get(metric) if run["status"] == "ok" else None
        curve = [{"step": m["step"], "samples": m["samples"], "value": m[metric]}
                 for m in read_metrics(Path(e["dir"])) if isinstance(m.get(metric), (int, float))
                 and math.isfinite(m[metric]) and m.get("samples") is not None and "loss" not in m]
        rows.append({"rule": e["rule"], "batch": int(e["batch"]), "seed": e.get("seed"), "status": run["status"],
                     "metric": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
                     "peak_lr": plan.get("lr"), "warmup_epochs": plan.get("warmup_epochs"),
                     "warmup_steps": plan.get("warmup_steps"), "steps": run["steps"], "samples": run["samples"],
                     "wall_time_s": run["wall_time_s"], "note": run["note"], "run": str(e.get("record") or e["dir"]),
                     "_curve": sorted(curve, key=lambda p: p["samples"])})
    return rows


def ladders(rows: list[dict]) -> tuple[Rung, dict[str, list[Rung]]]:
    """The base rung and, per rule, its ladder of rungs (the base rung first, shared by every rule)."""
    base_batch = min(r["batch"] for r in rows if r["rule"] == "base")
    base = Rung("base", base_batch, [r for r in rows if r["rule"] == "base"])
    out = {}
    for rule in [r for r in RULE_ORDER if any(row["rule"] == r for row in rows)]:
        batches = sorted({r["batch"] for r in rows if r["rule"] == rule})
        out[rule] = [base, *(Rung(rule, b, [r for r in rows if r["rule"] == rule and r["batch"] == b])
                             for b in batches)]
    return base, out


def mark_targets(rows: list[dict], target: float | None, higher_is_better: bool, base_batch: int) -> None:
    """Each row's steps, samples and estimated seconds to reach ``target`` (None: never, or no target)."""
    sign = -1 if higher_is_better else 1
    for r in rows:
        r["k"] = r["batch"] / base_batch
        hit = None
        if target is not None and r["_curve"]:
            hit = to_target([{"step": p["step"], "samples": p["samples"], "loss": sign * p["value"]}
                             for p in r["_curve"]], sign * target)
        r["steps_to_target"] = round(hit["steps"], 1) if hit else None
        r["samples_to_target"] = round(hit["samples"]) if hit else None
        rate = r["wall_time_s"] / r["steps"] if r.get("wall_time_s") and r.get("steps") else None
        r["time_to_target_s"] = round(hit["steps"] * rate, 1) if hit and rate else None


def assess(rungs: list[Rung], target: float, tolerance: float, higher_is_better: bool) -> dict:
    """How far one rule's ladder holds the target: per rung its gap (worse is positive), band, spread and
    verdict ("holds", "off", "noise": worse by more than the tolerance but within the seeds' spread, or
    "missing"), and ``holds_up_to`` (the largest batch up to which every rung holds or is within noise)."""
    base = rungs[0]

    def gaps(r: Rung) -> list[float]:  # each seed's distance from the target, worse is positive
        return [(target - v) if higher_is_better else (v - target) for v in r.values()]

    close_enough = max(tolerance * abs(target), *gaps(base))
    out, holds_up_to, broken = [], base.batch, False
    for rung in rungs[1:]:
        mean = rung.mean()
        spread = pooled_std(base, rung)
        band = max(tolerance * abs(target), 2 * spread if spread is not None else 0.0)
        if mean is None:
            verdict, gap = "missing", None
        else:
            gap = (target - mean) if higher_is_better else (mean - target)
            # within the seeds' spread only where a seed of the rung is itself as close to the target as the
            # tolerance or the base's own worse seed (blown-up seeds, far apart, have a wide spread that says
            # nothing about the target)
            straddles = min(gaps(rung)) <= close_enough
            verdict = ("holds" if gap <= tolerance * abs(target)
                       else "noise" if gap <= band and straddles else "off")
        out.append({"rung": rung, "gap": gap, "band": band, "spread": spread, "verdict": verdict})
        if not broken and verdict in ("holds", "noise"):
            holds_up_to = rung.batch
        else:
            broken = True
    return {"rungs": out, "holds_up_to": holds_up_to, "top": rungs[-1].batch,
            "first_off": next((a for a in out if a["verdict"] in ("off", "missing")), None)}


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _k(rung: Rung, base: Rung) -> str:
    return f"{rung.batch / base.batch:g}x"


def statements(base: Rung, assessed: dict[str, dict], target: float | None, metric: str, tolerance: float,
               warmup_epochs: float | None) -> list[str]:
    """Plain-words findings, each computed from ``assessed`` (see :func:`assess`)."""
    if target is None:
        return [f"No base run finished with a finite {metric}: there is no target, so nothing can be said."]
    n_base = len(base.values())
    lines = [f"Target: {metric} {target:.4g} at the base batch {base.batch} (mean of {n_base} seed(s)"
             + (f", std {base.std():.3g}" if base.std() is not None else "") + f"); tolerance {tolerance:.1%} of it."]
    for rule, a in assessed.items():
        name = RULE_NAMES.get(rule, rule)
        noisy = [x for x in a["rungs"] if x["verdict"] == "noise"]
        off = a["first_off"]
        if off is None:
            text = f"**{name}** holds the target up to the top of its ladder, batch {a['top']} ({a['top'] / base.batch:g}x)"
        else:
            rung = off["rung"]
            text = f"**{name}** holds the target up to batch {a['holds_up_to']} " \
                   f"({a['holds_up_to'] / base.batch:g}x); "
            if off["verdict"] == "missing":
                text += f"batch {rung.batch} has no finished run (diverged or failed)"
            else:
                text += (f"at batch {rung.batch} ({_k(rung, base)}) it falls off: {rung.mean():.4g}, worse by "
                         f"{off['gap']:.3g} ({off['gap'] / abs(target):.1%}), "
                         + (f"beyond the band {off['band']:.3g}" if off["gap"] > off["band"] else
                            f"inside the band {off['band']:.3g} but with no seed as close to the target as the "
                            "tolerance or the base's own seeds"))
        if noisy:
            text += "; " + ", ".join(
                f"at batch {x['rung'].batch} the gap {x['gap']:.3g} exceeds the tolerance but not the seeds' "
                f"spread (band {x['band']:.3g} = 2 x pooled std {x['spread']:.3g}): the seeds cannot tell it from "
                "the target (more seeds would)" for x in noisy)
        lines.append(text + ".")
    lines += _speedups(base, assessed)
    lines += _verdict(base, assessed, warmup_epochs)
    return lines


def _speedups(base: Rung, assessed: dict[str, dict]) -> list[str]:
    """LEGW's "speed-up over the baseline" (its 5.3x), measured: per rule, the rung above the base that
    reaches the target in the fewest steps, against the base's steps and this machine's seconds."""
    s0, t0 = base.mean("steps_to_target"), base.mean("time_to_target_s")
    if not s0:
        return []
    parts = []
    for rule, a in assessed.items():
        reached = [x["rung"] for x in a["rungs"] if x["rung"].mean("steps_to_target")]
        if not reached:
            parts.append(f"{RULE_NAMES.get(rule, rule)} never reaches it above the base batch")
            continue
        best = min(reached, key=lambda r: r.mean("steps_to_target"))
        t = best.mean("time_to_target_s")
        parts.append(f"{RULE_NAMES.get(rule, rule)} {s0 / best.mean('steps_to_target'):.3g}x fewer steps at batch "
                     f"{best.batch} ({_k(best, base)})" + (f", {t0 / t:.2g}x the speed in seconds" if t and t0 else ""))
    return [f"Speed-up to the target over the base batch ({s0:.4g} steps"
            + (f", {t0:.3g} s" if t0 else "") + "), the best rung per rule: " + "; ".join(parts)
            + ". Seconds are at each run's own step rate: where a step's cost grows with the batch (one CPU thread "
            "per run here) they follow the samples, not the steps; parallel hardware turns fewer steps into time."]


def _verdict(base: Rung, assessed: dict[str, dict], warmup_epochs: float | None) -> list[str]:
    """LEGW's claim against these runs: sqrt + LEGW holds to the top, and the other rules do not."""
    lines = []
    if warmup_epochs == 0:
        lines.append("The base warmup chosen is 0 epochs, so LEGW's warmup (k x 0) is none at every rung and "
                     "'sqrt + LEGW' is 'sqrt' (the driver runs them once, as sqrt): this ladder cannot separate them.")
    legw = assessed.get("legw")
    if legw is None:
        return lines + ["No LEGW ladder was run."]
    top = legw["top"]
    reach = {rule: a["holds_up_to"] for rule, a in assessed.items()}
    others = {rule: b for rule, b in reach.items() if rule != "legw"}
    if reach["legw"] == top and others and all(b < top for b in others.values()):
        lines.append(f"LEGW's claim shows here: sqrt + LEGW holds the base metric up to batch {top} "
                     f"({top / base.batch:g}x), and every other rule falls off before it ("
                     + ", ".join(f"{RULE_NAMES.get(r, r)} up to {b}" for r, b in others.items()) + ").")
    elif reach["legw"] == top:
        lines.append(f"The effect does not show: sqrt + LEGW holds up to batch {top}, but so does "
                     + ", ".join(RULE_NAMES.get(r, r) for r, b in others.items() if b == top)
                     + ", so this ladder cannot separate the rules. Separating them would take more steps at the "
                     "top rungs (longer runs) or the paper-scale ladders (SCALE=gpu, experiments/legw/README.md).")
    else:
        def names(pick):
            return ", ".join(f"{RULE_NAMES.get(r, r)}" + (f" (up to {b})" if b != reach["legw"] else "")
                             for r, b in others.items() if pick(b))

        further, level, less = (names(lambda b: b > reach["legw"]), names(lambda b: b == reach["legw"]),
                                names(lambda b: b < reach["legw"]))
        lines.append(f"The effect does not show in full: sqrt + LEGW holds only up to batch {reach['legw']} of {top} "
                     f"({reach['legw'] / base.batch:g}x of {top / base.batch:g}x)"
                     + "".join(f"; {text} {verb}" for text, verb in ((further, "reach(es) further"),
                                                                   (level, "hold(s) as far"),
                                                                   (less, "stop(s) before it")) if text)
                     + ". Testing the claim would take more epochs (more steps at the top rungs), more seeds where "
                     "the gaps are within the seeds' spread, or the paper-scale runs (SCALE=gpu).")
    return lines


def write_runs_csv(rows: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def _cell(rung: Rung, key: str = "metric") -> str:
    mean, std = rung.mean(key), rung.std(key)
    if mean is None:
        return "—" if rung.runs else ""
    return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"


def _table(headers: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(map(str, row)) + " |" for row in body)]


def render(rows, base, rules, assessed, target, *, metric, title, claim, tolerance, warmup_epochs) -> str:
    batches = sorted({r["batch"] for r in rows})
    by = {(rule, rung.batch): rung for rule, ladder in rules.items() for rung in ladder}  # base: every rule's
    lines = [f"# {title}", "", f"Paper's claim: {claim}.", "", "## What the runs show", ""]
    lines += [f"- {s}" for s in statements(base, assessed, target, metric, tolerance, warmup_epochs)]
    lines += ["", f"## {metric} per batch and rule", "",
              f"Mean ± std over seeds where there are two or more; the base rung ({base.batch}) is shared by every "
              f"rule and is the target. ✓ within the noise band of the target, ~ within the seeds' spread only, "
              "✗ outside it.", ""]
    marks = {"holds": "✓", "noise": "~", "off": "✗", "missing": "✗"}
    verdicts = {(rule, x["rung"].batch): marks[x["verdict"]] for rule, a in assessed.items() for x in a["rungs"]}
    body = []
    for b in batches:
        row = [b, f"{b / base.batch:g}"]
        for rule in rules:
            rung = by.get((rule, b))
            row.append("" if rung is None else _cell(rung) + (f" {verdicts[rule, b]}" if (rule, b) in verdicts else
                                                              " (target)"))
        body.append(row)
    lines += _table(["batch", "k", *(RULE_NAMES.get(r, r) for r in rules)], body)
    lines += ["", "## Steps (and estimated seconds) to reach the target", "",
              "From each run's eval curve (first crossing, interpolated); seconds at the run's mean step rate. "
              "Perfect scaling: the base's steps / k. — never reached.", ""]
    base_steps = base.mean("steps_to_target")
    body = []
    for b in batches:
        row = [b, fmt(base_steps / (b / base.batch), 4) if base_steps else "—"]
        for rule in rules:
            rung = by.get((rule, b))
            if rung is None:
                row.append("")
                continue
            steps, secs = rung.mean("steps_to_target"), rung.mean("time_to_target_s")
            row.append("—" if steps is None else f"{steps:.4g} ({secs:.3g} s)" if secs else f"{steps:.4g}")
        body.append(row)
    lines += _table(["batch", "perfect scaling", *(RULE_NAMES.get(r, r) for r in rules)], body)
    lines += ["", "## Every run", ""]
    lines += _table(["rule", "batch", "seed", "status", metric, "peak lr", "warmup epochs", "warmup steps", "steps",
                     "note"], [[r["rule"], r["batch"], r["seed"], r["status"], fmt(r["metric"]), fmt(r["peak_lr"]),
                                fmt(r["warmup_epochs"]), r["warmup_steps"], r["steps"], r["note"]] for r in rows])
    return "\n".join(lines) + "\n"


def plot_metric_vs_batch(base: Rung, rules: dict, target, band, metric: str, path: Path) -> Path:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for rule, ladder in rules.items():
        pts = [(r.batch, r.mean(), r.std() or 0.0) for r in ladder if r.mean() is not None]
        if pts:
            line, marker = RULE_STYLE.get(rule, ("-", "o"))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], ls=line, marker=marker,
                        capsize=3, label=RULE_NAMES.get(rule, rule))
    if target is not None:
        ax.axhline(target, color="k", lw=0.8, ls="--", label="target (base batch)")
        ax.axhspan(target - band, target + band, color="k", alpha=0.08, label="tolerance band")
    values = [r.mean() for ladder in rules.values() for r in ladder if r.mean() is not None]
    if values and min(values) > 0 and max(values) > 10 * min(values):  # a blown-up run (perplexity 1e26)
        ax.set_yscale("log")
        if target is not None and max(values) > 1e3 * abs(target):  # keep the rules that did not blow up legible
            ax.set_ylim(min(values) / 2, 1e3 * abs(target))
            ax.set_title(f"{metric}, fixed epoch budget (cut at 1000x the target)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    if not ax.get_title():
        ax.set_title(f"{metric} at a fixed epoch budget")
    return save_figure(fig, path, 120)


def plot_steps_to_target(base: Rung, rules: dict, path: Path) -> Path:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    batches = sorted({r.batch for ladder in rules.values() for r in ladder})
    base_steps = base.mean("steps_to_target")
    if base_steps:
        ax.plot(batches, [base_steps * base.batch / b for b in batches], "k--", lw=0.8, label="perfect scaling")
    for rule, ladder in rules.items():
        pts = [(r.batch, r.mean("steps_to_target")) for r in ladder if r.mean("steps_to_target")]
        if pts:
            line, marker = RULE_STYLE.get(rule, ("-", "o"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=line, marker=marker, label=RULE_NAMES.get(rule, rule))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to the target")
    ax.legend(fontsize=8)
    ax.set_title("steps to reach the base batch's metric")
    return save_figure(fig, path, 120)


def write_legw_report(entries: list[dict], out_dir: Path, *, task: str, metric: str, higher_is_better: bool,
                      tolerance: float, title: str = "LEGW at reduced scale", claim: str = "",
                      provenance: dict | None = None) -> dict:
    """Write the LEGW report of ``entries`` ({"rule", "batch", "seed", "dir"}, base rung as rule "base") into
    ``out_dir``; returns {"files", "assessed", "target", "statements"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(entries, metric)
    base, rules = ladders(rows)
    target = base.mean()
    mark_targets(rows, target, higher_is_better, base.batch)
    assessed = {rule: assess(ladder, target, tolerance, higher_is_better) for rule, ladder in rules.items()} \
        if target is not None else {}
    warmups = {r["warmup_epochs"] for r in base.runs if r["warmup_epochs"] is not None}
    warmup = warmups.pop() if len(warmups) == 1 else None
    files = {"runs.csv": write_runs_csv(rows, out_dir / "runs.csv")}
    text = render(rows, base, rules, assessed, target, metric=metric, title=title, claim=claim,
                  tolerance=tolerance, warmup_epochs=warmup)
    atomic_write_text(out_dir / "table.md", text)
    files["table.md"] = out_dir / "table.md"
    band = tolerance * abs(target) if target is not None else 0.0
    files["metric_vs_batch.png"] = plot_metric_vs_batch(base, rules, target, band, metric, out_dir / "metric_vs_batch.png")
    files["steps_to_target.png"] = plot_steps_to_target(base, rules, out_dir / "steps_to_target.png")
    atomic_write_json(out_dir / "provenance.json", {
        **(provenance or {}), "task": task, "metric": metric, "higher_is_better": higher_is_better,
        "tolerance_relative": tolerance, "target": target, "base_batch": base.batch,
        "holds_up_to": {rule: a["holds_up_to"] for rule, a in assessed.items()},
        "runs": [r["run"] for r in rows]})
    files["provenance.json"] = out_dir / "provenance.json"
    return {"files": files, "assessed": assessed, "target": target,
            "statements": statements(base, assessed, target, metric, tolerance, warmup)}
