"""The report's figures. matplotlib's object API (Figure, no pyplot) so no GUI backend is ever touched."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from largebatch.report.runs import optimizer_rank
from largebatch.report.summary import SeedGroup, ladder, variants
from largebatch.runfolder import read_metrics

MAX_LEGEND = 12  # curves per panel beyond which the legend is left out
MARKERS = "os^v*D"


def save_figure(fig: Figure, path: Path, dpi: int) -> Path:
    """PNG under a temporary name in the same folder, renamed into place when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def batch_axis(ax, batches, label: str = "global batch") -> None:
    """A log2 batch axis ticked at the ladder's own batch sizes (not every 2^k: their labels overlap)."""
    ax.set_xscale("log", base=2)
    batches = sorted({b for b in batches if b})
    if batches:
        ax.set_xticks(batches, labels=[str(b) for b in batches])
        ax.tick_params(axis="x", labelrotation=45 if len(batches) > 8 else 0)
    ax.set_xlabel(label)


def errorbars(ax, points: list[tuple[float, float, float, float]], label: str, **style):
    """(batch, mean, lower, upper) points as one line with asymmetric error bars."""
    points = sorted(points)
    return ax.errorbar([p[0] for p in points], [p[1] for p in points],
                       yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], capsize=3, label=label,
                       **style)


def perfect_scaling(ax, batches, value: float, base: float, steps: bool = True, **style) -> None:
    """What perfect scaling from ``value`` at batch ``base`` gives: steps halve when the batch doubles (samples
    stay flat)."""
    batches = sorted(set(batches))
    ax.plot(batches, [value * base / b if steps else value for b in batches], **{"ls": "--", **style})


def plot_ladder_metric(series: dict[str, list[tuple[float, float, float, float]]], path: Path, *, metric: str,
                       title: str, target: float | None = None, margin: float | None = None,
                       baseline: tuple[float, str] | None = None, styles: dict[str, tuple[str, str]] | None = None
                       ) -> Path:
    """A ladder's metric against the batch: each row's (batch, mean, 95% interval) points, the target with its
    equivalence margin, and the trivial baseline the base must beat."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        if points:
            line, marker = (styles or {}).get(name, ("-", MARKERS[i % len(MARKERS)]))
            errorbars(ax, points, name, ls=line, marker=marker)
    if target is not None:
        ax.axhline(target, color="k", lw=0.8, ls="--", label="target (base batch)")
        if margin:
            ax.axhspan(target - margin, target + margin, color="k", alpha=0.08, label="margin")
    # the view spans the means and the target: a 2-seed t interval can run far past any meaningful value (an
    # accuracy below 0) and would squash every mean into a line (its bar leaves the view); the trivial
    # baseline is drawn where it lies near them, else named in the legend as off the axis
    shown = [p[1] for points in series.values() for p in points] + ([target] if target is not None else [])
    lo, hi = (min(shown), max(shown)) if shown else (None, None)
    if baseline is not None:
        near = lo is None or lo - (hi - lo) <= baseline[0] <= hi + (hi - lo)
        if near:
            ax.axhline(baseline[0], color="r", lw=0.8, ls=":", label=baseline[1])
            lo, hi = (baseline[0], baseline[0]) if lo is None else (min(lo, baseline[0]), max(hi, baseline[0]))
        else:
            ax.plot([], [], color="r", lw=0.8, ls=":", label=f"{baseline[1]}: {baseline[0]:.3g}, off the axis")
    if lo is not None:
        pad = 0.15 * ((hi - lo) or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    batch_axis(ax, [p[0] for points in series.values() for p in points], "batch size")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path, 120)


def plot_ladder_steps(curves: dict[str, dict[int, float]], fits: dict, noise: list[float], path: Path,
                      base: int | None = None, ladder: list[int] = ()) -> Path:
    """Steps to the strictest target against the batch, a line per row, with perfect scaling from the base,
    each McCandlish fit (an object with ``b_crit`` and ``steps(batch)``) and the measured B_simple of the last
    quarter of training (``noise``: one value a rung; the median is drawn) over the ``ladder``'s batches."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    batches = sorted({b for c in curves.values() for b in c} | set(ladder))
    for i, (name, c) in enumerate(curves.items()):
        pts = sorted(c.items())
        if pts:
            ax.plot([b for b, _ in pts], [s for _, s in pts], marker=MARKERS[i % len(MARKERS)], label=name)
    first = next((c[base] for c in curves.values() if base in c), None)
    if first and batches:
        perfect_scaling(ax, batches, first, base, color="k", lw=0.8, label="perfect scaling")
    for name, f in fits.items():
        if f is not None and batches:
            ax.plot(batches, [f.steps(b) for b in batches], color="grey", lw=1.5, alpha=0.6,
                    label=f"fit ({name}): B_crit {f.b_crit:.3g}")
    if noise:
        ax.axvline(statistics.median(noise), color="tab:red", lw=0.8, ls=":", label="B_simple, last quarter")
    batch_axis(ax, batches, "batch size")
    ax.set_yscale("log")
    ax.set_ylabel("steps to the strictest target")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("steps to result (validation)")
    return save_figure(fig, Path(path), 120)


def _optimizers(items, key) -> list[str]:
    return sorted({key(x) for x in items}, key=optimizer_rank)


def plot_metric_vs_batch(cells: list[SeedGroup], path: Path, unigram: dict | None = None) -> Path:
    """Eval loss and downstream accuracy against the batch (log2 axis), one line per optimizer (and per
    configuration, when an optimizer's runs differ in more than the batch: dotted, labelled with the keys);
    mixed-batch runs are stars at their last stage's batch; error bars are the seed-to-seed standard deviation."""
    panels = [("eval_loss", "eval masked-LM loss"), ("downstream_accuracy", "downstream accuracy")]
    # a sweep without fine-tuning gets one panel, not an empty second one
    panels = [p for p in panels if p[0] == "eval_loss" or any(c.mean(p[0]) is not None for c in cells)]
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        plotted = False
        for opt in _optimizers(cells, lambda c: c.optimizer):
            color = None
            # one line per configuration (runs differing in more than the batch are never joined up)
            for n, variant in enumerate(variants(cells, opt)):
                rungs = [c for c in variant if c.mean(key) is not None]
                if not rungs:
                    continue
                name = opt if n == 0 and not rungs[0].differs_in else f"{opt} {rungs[0].differs_in}"
                line = errorbars(ax, [(c.batch, c.mean(key), c.mean(key) - (c.std(key) or 0.0),
                                       c.mean(key) + (c.std(key) or 0.0)) for c in rungs], name, marker="o",
                                 linestyle="-" if n == 0 else ":")
                plotted = True
                color = color or line[0].get_color()
            for c in (c for c in cells if c.optimizer == opt and c.stages > 1 and c.mean(key) is not None):
                ax.plot([c.batch], [c.mean(key)], marker="*", markersize=12, linestyle="none", color=color,
                        label=f"{opt} mixed {c.batch_schedule}")
                plotted = True
        if key == "eval_loss" and unigram is not None:
            ax.axhline(unigram["loss"], color="grey", linestyle="--", label="unigram baseline")
        if key == "downstream_accuracy":
            randoms = [r["random_init_accuracy"] for c in cells for r in c.runs
                       if r.get("random_init_accuracy") is not None]
            if randoms:
                ax.axhline(sum(randoms) / len(randoms), color="grey", linestyle=":", label="random init (mean)")
        if not plotted:
            ax.text(0.5, 0.5, f"no run has {label}", ha="center", va="center", transform=ax.transAxes)
        else:
            batch_axis(ax, [c.batch for c in cells], "global batch (last stage)")
            ax.legend(fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("End-of-training metrics against batch size (same sample budget)")
    return save_figure(fig, path, dpi=120)


def _panels(n: int, title: str):
    """One panel per optimizer, on one shared y axis: the panels are read against each other."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes


def _curves(rows: list[dict], path: Path, *, pick, ylabel: str, title: str, log_y: bool = False) -> Path:
    """One panel per optimizer, one curve per run (dashed when the run did not finish)."""
    series = []
    for r in rows:
        lines = read_metrics(r["_dir"]) if r.get("_dir") else []
        pts = [(m["samples"], m[pick]) for m in lines if pick in m and m.get("samples") is not None
               and isinstance(m[pick], (int, float)) and math.isfinite(m[pick])]
        if pts:
            series.append((r, pts))
    opts = _optimizers(series, lambda s: s[0]["optimizer"]) or ["(none)"]
    fig, axes = _panels(len(opts), title)
    for ax, opt in zip(axes, opts):
        for r, pts in (s for s in series if s[0]["optimizer"] == opt):
            label = (f"batch {r['batch_schedule']} seed {r['seed']}"
                     + (f" {r['differs_in']}" if r.get("differs_in") else "")
                     + ("" if r["status"] == "ok" else f" ({r['status']})"))
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None,
                    linestyle="-" if r["status"] == "ok" else "--", label=label)
        shown = sum(s[0]["optimizer"] == opt for s in series)
        if not series:
            ax.text(0.5, 0.5, "no logged metrics", ha="center", va="center", transform=ax.transAxes)
        elif shown <= MAX_LEGEND:
            ax.legend(fontsize=7)
        else:  # a legend of dozens of runs would hide the curves; runs.csv names them
            opt = f"{opt} ({shown} runs)"
        if log_y and series:
            ax.set_yscale("log")
        ax.set_title(opt)
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)


def plot_eval_loss_vs_samples(rows: list[dict], path: Path) -> Path:
    return _curves(rows, path, pick="eval/loss", ylabel="eval masked-LM loss",
                   title="Eval loss against samples seen (one curve per run)")


def plot_logged_lr(rows: list[dict], path: Path) -> Path:
    return _curves(rows, path, pick="lr", ylabel="learning rate (logged)", log_y=True,
                   title="Learning rate actually used, against samples seen")


def plot_steps_to_target(cells: list[SeedGroup], path: Path, target: dict | None = None) -> Path:
    """Steps to the target loss against the batch (log-log), one line per optimizer's ladder (the mean over the
    seeds that reached it), with perfect scaling drawn dashed from each base rung (steps halve when the batch
    doubles); beside it samples to target, whose perfect scaling is flat."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [("steps_to_target", "steps to target", True), ("samples_to_target", "samples to target", False)]
    for ax, (key, label, steps) in zip(axes, panels):
        plotted = False
        for opt in _optimizers(cells, lambda c: c.optimizer):
            rungs = ladder(cells, opt)
            reached = [c for c in rungs if c.mean(key) is not None]
            if not reached:
                continue
            line = ax.plot([c.batch for c in reached], [c.mean(key) for c in reached], marker="o", label=opt)[0]
            plotted = True
            if rungs[0].mean(key) is not None:  # perfect scaling from the base rung, over the whole ladder
                perfect_scaling(ax, [c.batch for c in rungs], rungs[0].mean(key), rungs[0].batch, steps=steps,
                                color=line.get_color(), alpha=0.6, label=f"{opt} perfect scaling")
        if plotted:
            batch_axis(ax, [c.batch for c in cells if c.stages == 1])
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run reached a target loss", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("global batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    shown = f" {target['loss']:.4f}" if target else ""
    fig.suptitle(f"Steps and samples to the target eval loss{shown} (dashed: perfect scaling)")
    return save_figure(fig, path, dpi=120)


def _noise_points(row: dict) -> list[tuple[float, float]]:
    lines = read_metrics(row["_dir"]) if row.get("_dir") else []
    return [(m["samples"], m["noise/b_simple"]) for m in lines
            if m.get("samples") is not None and isinstance(m.get("noise/b_simple"), (int, float))
            and math.isfinite(m["noise/b_simple"]) and m["noise/b_simple"] > 0]


def plot_noise_scale(cells: list[SeedGroup], path: Path, optimizers: tuple[str, ...] = ("lamb", "adamw")) -> Path:
    """The logged gradient noise scale B_simple against samples seen (log y), one panel per optimizer, one
    colour per rung of its ladder (the lowest seed drawn solid, other seeds lighter), with the ladder's batch
    sizes as dashed horizontal lines: a rung above the curve is beyond the measured noise scale."""
    fig, axes = _panels(len(optimizers), "Gradient noise scale B_simple (McCandlish et al. 2018) against samples seen")
    for ax, opt in zip(axes, optimizers):
        rungs = ladder(cells, opt)
        colors = [f"C{i % 10}" for i in range(len(rungs))]
        plotted = False
        for c, color in zip(rungs, colors):
            for n, r in enumerate(sorted(c.runs, key=lambda r: r["seed"] if r["seed"] is not None else -1)):
                pts = _noise_points(r)
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=1.0 if n == 0 else 0.35,
                            label=f"batch {c.batch_schedule}" if n == 0 else None)
                    plotted = True
        if plotted:
            for c, color in zip(rungs, colors):
                ax.axhline(c.batch, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
            ax.set_yscale("log")
            ax.legend(fontsize=7, title="curves: rung; dashed: its batch", title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run logged noise/b_simple", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(opt)
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("B_simple (samples)")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)
