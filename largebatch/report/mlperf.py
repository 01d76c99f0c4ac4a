"""Runs of an MLPerf workload against MLPerf's reference convergence points (:mod:`.rcp`), for `lb-report`.

A run is compared when its config is MLPerf's benchmark (:func:`match`); docs/mlperf.md says which recipes
are and why. Its time to MLPerf's target is read from its records: the summary's ``stop_at`` entry when the
run stopped at exactly that target, else its first evaluation at or above it in ``metrics.jsonl``. Runs of one
configuration and batch (seeds) form a set, judged by :func:`.rcp.classify`; the report gets a table, a
sentence per set and ``mlperf_rcp.png`` (reference means with min-max bars, our runs over them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from largebatch.report import rcp
from largebatch.report.plots import save_figure
from largebatch.report.runs import result_config
from largebatch.report.text import fmt, table
from largebatch.runfolder import SUMMARY, read_json, read_metrics, read_plan

METRIC = "eval/accuracy"  # ResNet: top-1; BERT: masked-LM accuracy (the tasks' eval/accuracy)
IMAGENET_TRAIN = 1281167
RESNET_OPTIMIZERS = ("lars_mlperf", "lars")  # MLPerf's LARS, and ours with the lr outside the momentum
LAMB_OPTIMIZERS = ("lamb", "lamb_v1", "lamb_v3", "lambc", "nvlamb")
COUNTED = ("ok", "failed")  # a failed run that never reached the target counts as not converged (MLPerf: aborted)
PLOT = "mlperf_rcp.png"
WORDS = {"within": "within the reference's spread",
         "faster": "faster than the reference allows: suspicious (MLPerf's checker rejects such a result)",
         "slower": "slower than the reference (MLPerf accepts it; it only costs time)",
         "not reached": "did not reach the target",
         "no reference": "no reference: the batch is above the largest RCP (MLPerf asks for a new RCP)"}
# RCP hyperparameter -> how to read ours (plan = the last stage's plan.json entry, cfg = the flat config)
RESNET_RECIPE = {
    "opt_base_learning_rate": lambda plan, cfg: plan.get("lr"),
    "opt_learning_rate_warmup_epochs": lambda plan, cfg: plan.get("warmup_epochs"),
    "opt_momentum": lambda plan, cfg: cfg.get("optimizer.momentum"),
    "opt_weight_decay": lambda plan, cfg: cfg.get("optimizer.weight_decay"),
    "opt_learning_rate_decay_steps": lambda plan, cfg: (plan["total_steps"] - plan.get("warmup_steps", 0)
                                                        if "total_steps" in plan else None),
    "model_bn_span": lambda plan, cfg: cfg.get("model.bn_virtual_batch") or plan.get("micro_batch"),
    "opt_end_learning_rate": lambda plan, cfg: cfg.get("schedule.end_lr"),
    "opt_learning_rate_decay_poly_power": lambda plan, cfg: cfg.get("schedule.power"),
    "epsilon": lambda plan, cfg: cfg.get("optimizer.eps"),
}


def match(row: dict) -> tuple[str | None, str | None]:
    """(the MLPerf benchmark the run is, None) or (None, why a run that looks like one is not compared), or
    (None, None) for any other workload."""
    cfg = row.get("_config") or {}
    model, optimizer = cfg.get("model.name"), cfg.get("optimizer.name")
    if model == "resnet" and cfg.get("model.depth") == 50:
        epoch = _last_stage(row).get("train_samples") or cfg.get("data.train_samples")
        if optimizer not in RESNET_OPTIMIZERS:
            return None, (f"ResNet-50 with {optimizer}: MLPerf's ResNet-50 RCPs are LARS runs "
                          "(optimizer=lars_mlperf), so other optimizers are not compared")
        if epoch != IMAGENET_TRAIN:
            return None, (f"ResNet-50 with LARS on {fmt(epoch) if epoch else 'an unknown number of'} training images, not ImageNet-1k's "
                          f"{IMAGENET_TRAIN}: not MLPerf's benchmark")
        return "resnet", None
    if model == "bert" and cfg.get("model.size") == "large" and optimizer in LAMB_OPTIMIZERS:
        return None, ("BERT-Large with LAMB: MLPerf's BERT RCPs count the samples of one phase at sequence length "
                      "512 that starts from MLPerf's phase-1 checkpoint; our runs train from random initialisation "
                      "(no config loads that checkpoint), so they are not compared")
    return None, None


@dataclass
class Comparison:
    benchmark: rcp.Benchmark
    label: str  # optimizer, batch and what sets the configuration apart
    batch: int
    runs: list[dict]  # per counted run: run, seed, status, steps, samples, value (None: not reached)
    verdict: rcp.Verdict
    pending: int = 0  # runs still running or unfinished: not counted
    differences: list[str] = field(default_factory=list)  # our recipe against the RCP's, at a measured RCP


@dataclass
class MlperfReport:
    comparisons: list[Comparison]
    not_compared: list[str]  # distinct reasons

    def provenance(self) -> dict:
        used = {c.benchmark.name: c.benchmark for c in self.comparisons}
        return {name: {**b.source, **{k: b.info[k] for k in ("mlperf_version", "path", "blob", "target", "unit")}}
                for name, b in used.items()}

    def markdown(self) -> list[str]:
        lines = ["## Against MLPerf's reference convergence points", ""]
        for bench in {c.benchmark.name: c.benchmark for c in self.comparisons}.values():
            mine = [c for c in self.comparisons if c.benchmark is bench]
            unit = bench.unit
            lines += [f"{bench.info['title']}: {unit} to {bench.info['metric']} {bench.target} against MLPerf "
                      f"{bench.info['mlperf_version']}'s RCPs (`{bench.info['path']}`, mlcommons/logging at "
                      f"`{bench.source['commit'][:12]}`). ![{PLOT}]({PLOT})", ""]
            lines += table(["run set", "batch", "reached", f"ours ({unit})", "reference", "RCP mean (min–max)",
                            "accepted for this many runs", "MLPerf bound (full submission)", "verdict"],
                           [_table_row(c) for c in mine])
            lines += ["", *[f"- {_sentence(c)}" for c in mine], ""]
        lines += [f"- Not compared: {reason}." for reason in self.not_compared]
        if self.comparisons:
            lines += ["", "Rule (largebatch/report/rcp.py, after MLPerf's RCP checker): a set's time is the mean of its "
                      "runs without the fastest and slowest (with 3 or more runs; a run that never reached the target "
                      "counts as infinitely slow); the reference is the RCP at the batch, else a linear interpolation "
                      "between the neighbouring RCPs MLPerf keeps; 'faster' / 'slower' when a one-sided t-test at "
                      "alpha 0.05 with the RCP's spread says so for this many runs. MLPerf itself only rejects "
                      "'faster', at the bound for a full submission."]
        return [*lines, ""]


def compare_runs(rows: list[dict], benchmarks: dict[str, rcp.Benchmark] | None = None) -> MlperfReport | None:
    """The comparison of every run set of an MLPerf workload in ``rows``; None when no row is one or looks
    like one."""
    sets: dict[tuple, list[dict]] = {}
    reasons: list[str] = []
    for row in rows:
        name, reason = match(row)
        if reason and reason not in reasons:
            reasons.append(reason)
        if name:
            key = (name, row["optimizer"], row["batch"], repr(sorted(result_config(row).items())))
            sets.setdefault(key, []).append(row)
    if not sets and not reasons:
        return None
    benchmarks = benchmarks or rcp.load_benchmarks()
    comparisons = [compare_set(benchmarks[key[0]], group) for key, group in sorted(sets.items(), key=lambda kv: kv[0][:3])]
    return MlperfReport(comparisons, reasons)


def compare_set(bench: rcp.Benchmark, rows: list[dict]) -> Comparison:
    """One configuration at one batch (its seeds) against ``bench``'s RCPs."""
    runs = []
    for r in rows:
        reached = time_to_target(r, bench)
        if reached is not None or r["status"] in COUNTED:
            runs.append({"run": r["run"], "seed": r.get("seed"), "status": r["status"], **(reached or {"value": None})})
    batch = rows[0]["batch"]
    verdict = rcp.classify(bench, batch, [run["value"] for run in runs])
    label = f"{rows[0]['optimizer']} batch {batch}" + (f" ({rows[0]['differs_in']})" if rows[0].get("differs_in") else "")
    return Comparison(bench, label, batch, runs, verdict, pending=len(rows) - len(runs),
                      differences=_differences(bench, rows[0]))


def time_to_target(row: dict, bench: rcp.Benchmark) -> dict | None:
    """{"steps", "samples", "value" (in the benchmark's unit)} at which the run first reached MLPerf's target,
    or None."""
    run_dir = Path(row["_dir"])
    stop = (read_json(run_dir / SUMMARY) or {}).get("stop_at") or {}
    if stop.get("reached") and stop.get("metric") == METRIC and stop.get("target") == bench.target:
        steps, samples = stop.get("step"), stop.get("samples")
    else:
        first = next((m for m in read_metrics(run_dir) if isinstance(m.get(METRIC), (int, float))
                      and m[METRIC] >= bench.target and m.get("samples") is not None), None)
        if first is None:
            return None
        steps, samples = first.get("step"), first["samples"]
    per_unit = bench.info.get("epoch_samples") or 1  # epochs (ResNet) or samples (BERT)
    return {"steps": steps, "samples": samples, "value": samples / per_unit}


def _differences(bench: rcp.Benchmark, row: dict) -> list[str]:
    """Our recipe's values that differ from the measured RCP at the same batch (none when interpolated)."""
    point, where = bench.reference_at(row["batch"])
    if bench.name != "resnet" or where != "measured":
        return []
    plan, cfg, out = _last_stage(row), row.get("_config") or {}, []
    if cfg.get("optimizer.name") != "lars_mlperf":
        out.append(f"optimizer {cfg.get('optimizer.name')} (the RCPs: MLPerf's LARS, optimizer=lars_mlperf)")
    for key, theirs in point.hyperparameters.items():
        ours = RESNET_RECIPE[key](plan, cfg) if key in RESNET_RECIPE else None
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and abs(ours - theirs) > 1e-9 * max(1, abs(theirs)):
            out.append(f"{key} {fmt(ours)} (RCP {fmt(theirs)})")
    return out


def _last_stage(row: dict) -> dict:
    plan = read_plan(row["_dir"]) if row.get("_dir") else []
    return plan[-1] if plan else {}


def _num(x) -> str:
    return fmt(float(x), 4) if x is not None else "—"


def _table_row(c: Comparison) -> list:
    v, ref = c.verdict, c.verdict.reference
    spread = (f"{_num(ref.mean)} ({_num(min(ref.runs))}–{_num(max(ref.runs))})" if ref and ref.runs
              else _num(ref.mean) if ref else "—")
    how = {"measured": f"RCP {ref.batch}" if ref else "", "below": f"smallest RCP {ref.batch}" if ref else "",
           "interpolated": ref.name if ref else "", "above": "none"}[v.where]
    accepted = f"{_num(v.lower)}–{_num(v.upper)}" if v.lower is not None else "—"
    return [c.label, c.batch, f"{v.reached}/{v.runs}", _num(v.mean), how, spread, accepted,
            f"≥ {_num(v.mlperf_lower)}" if v.mlperf_lower is not None else "—", v.verdict]


def _sentence(c: Comparison) -> str:
    v, bench = c.verdict, c.benchmark
    said = f"{c.label}: {WORDS[v.verdict]}"
    if v.mean is not None:
        said += f" ({_num(v.mean)} {bench.unit}, the mean of {v.averaged} run(s))"
    if v.where == "below":
        said += f"; below the RCPs' batches, so compared with the smallest kept RCP (batch {v.reference.batch}), as MLPerf does"
    if v.where == "interpolated" and any(p.batch == c.batch for p in bench.points):
        said += "; the measured RCP at this batch is one MLPerf prunes (slower than its neighbours), so it interpolates"
    if v.verdict != "faster" and v.mean is not None and v.mlperf_lower is not None and v.mean < v.mlperf_lower:
        said += f"; a full MLPerf submission with this mean would be rejected (bound {_num(v.mlperf_lower)})"
    elif v.verdict == "within" and v.speedup:
        said += f"; faster than the RCP mean, so MLPerf would scale its time by {v.speedup:.3f}"
    if c.pending:
        said += f"; {c.pending} unfinished run(s) not counted"
    if c.differences:
        said += "; recipe differs from the RCP in " + ", ".join(c.differences)
    return said + "."


def plot(report: MlperfReport, path: Path) -> Path:
    """Per compared benchmark, steps (log) and time (epochs or samples) to MLPerf's target against the batch: every
    measured RCP as its mean with min-max bars (hollow where MLPerf prunes it), the line MLPerf interpolates along,
    the fastest mean it accepts, and our runs (dots) with each set's mean (a large marker)."""
    benches = list({c.benchmark.name: c.benchmark for c in report.comparisons}.values())
    fig = Figure(figsize=(11, 4.2 * max(1, len(benches))), layout="constrained")
    axes = fig.subplots(max(1, len(benches)), 2, squeeze=False)
    for (ax_steps, ax_time), bench in zip(axes, benches):
        per_unit = bench.info.get("epoch_samples") or 1
        kept = {p.batch for p in bench.kept()}
        low, high = min(kept), max(kept)
        grid = sorted({*kept, *(round(low * (high / low) ** (i / 60)) for i in range(61))})
        for ax, to_steps in ((ax_steps, True), (ax_time, False)):
            def y(value, batch, to_steps=to_steps, per_unit=per_unit):  # the panel's quantity: steps or time
                return value * per_unit / batch if to_steps else value

            for p in bench.points:
                mean, low, high = y(p.mean, p.batch), y(min(p.runs), p.batch), y(max(p.runs), p.batch)
                ax.errorbar([p.batch], [mean], yerr=[[mean - low], [high - mean]], marker="s", color="grey",
                            capsize=3, markerfacecolor="grey" if p.batch in kept else "white")
            along = [bench.reference_at(b)[0] for b in grid]  # what MLPerf compares a batch with: linear in it
            ax.plot(grid, [y(p.mean, b) for p, b in zip(along, grid)], color="grey", linestyle=":",
                    label=f"MLPerf {bench.info['mlperf_version']} RCPs (mean, min–max)")
            ax.plot(grid, [y(bench.mlperf_lower_bound(p), b) for p, b in zip(along, grid)], color="grey",
                    linestyle="--", linewidth=0.8, label="fastest mean MLPerf accepts (full submission)")
            for c in (c for c in report.comparisons if c.benchmark is bench):
                values = [r["value"] for r in c.runs if r["value"] is not None]
                dots = ax.plot([c.batch] * len(values), [y(v, c.batch) for v in values], marker=".",
                               linestyle="none", alpha=0.6)[0]
                if c.verdict.mean is not None:
                    ax.plot([c.batch], [y(c.verdict.mean, c.batch)], marker="o", markersize=9, linestyle="none",
                            color=dots.get_color(), label=f"{c.label}: {c.verdict.verdict}")
            ax.set_xscale("log", base=2)
            if to_steps:
                ax.set_yscale("log")
            ax.set_xlabel("global batch")
            ax.set_ylabel(f"{'steps' if to_steps else bench.unit} to {bench.info['metric']} {bench.target}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        ax_steps.set_title(bench.info["title"], fontsize=9)
    fig.suptitle("Against MLPerf's reference convergence points (hollow: RCPs MLPerf prunes)")
    return save_figure(fig, path, dpi=120)
