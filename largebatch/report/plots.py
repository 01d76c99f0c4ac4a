"""The report's figures. matplotlib's object API (Figure, no pyplot) so no GUI backend is ever touched."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from largebatch.report.runs import optimizer_rank, read_metrics
from largebatch.report.summary import Cell, variants

MAX_LEGEND = 12  # curves per panel beyond which the legend is left out


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


def _optimizers(items, key) -> list[str]:
    return sorted({key(x) for x in items}, key=optimizer_rank)


def plot_metric_vs_batch(cells: list[Cell], path: Path, unigram: dict | None = None) -> Path:
    """Eval loss and downstream accuracy against the batch (log2 axis), one line per optimizer (and per
    configuration, when an optimizer's runs differ in more than the batch: dotted, labelled with the keys);
    mixed-batch runs are stars at their last stage's batch; error bars are the seed-to-seed standard deviation."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [("eval_loss", "eval masked-LM loss"), ("downstream_accuracy", "downstream accuracy")]
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
                line = ax.errorbar([c.batch for c in rungs], [c.mean(key) for c in rungs],
                                   yerr=[c.std(key) or 0.0 for c in rungs], marker="o", capsize=3, label=name,
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
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
        ax.set_xlabel("global batch (last stage)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("End-of-training metrics against batch size (same sample budget)")
    return save_figure(fig, path, dpi=120)


def _panels(n: int, title: str):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
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
