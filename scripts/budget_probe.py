"""Where does a base run plateau? The epoch budget of a batch ladder, read from one long base run.

    lb-train experiment=mnist_lstm data=fashion_mnist data.valid_size=5000 data.max_train=49152 epochs=60 \
        eval_every_epochs=1.0 eval_batch=1000 optimizer.lr=0.003 seed=1 hydra.run.dir=outputs/studies/base60
    python scripts/budget_probe.py outputs/studies/base60 --out results/legw/mnist_lstm_budget

From the run's validation curve (``--select``, mean of the last 3 evaluations): the first epoch within
``--margin`` (relative) of the best the run reaches (the plateau), the epoch of the lowest validation loss
(past it the model overfits in loss), the test metric at the same points, and B_simple by quarter of the
run. Writes table.md, curve.png and the run's small records into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matplotlib.figure import Figure  # noqa: E402

from largebatch import protocol as P  # noqa: E402
from largebatch.drivers import rel  # noqa: E402
from largebatch.fileio import atomic_write_text  # noqa: E402
from largebatch.report.plots import save_figure  # noqa: E402
from largebatch.runfolder import ENV, copy_records, read_json, read_metrics, read_plan  # noqa: E402


def probe(run_dir: Path, select: str, report: str, margin: float, last: int = 3) -> dict:
    """The plateau and overfitting epochs of one run, from its records."""
    plan = (read_plan(run_dir) or [{}])[-1]
    per_epoch = plan["steps_per_epoch"]
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if select in m and "loss" not in m]
    epochs = [m["step"] / per_epoch for m in evals]
    smooth = [P.final_value([{"value": m[select]} for m in evals[:i + 1]], last) for i in range(len(evals))]
    best = max(smooth)
    plateau = next(e for e, v in zip(epochs, smooth) if v >= best - margin * abs(best))
    loss_key = select.rsplit("/", 1)[0] + "/loss"
    lowest = min(range(len(evals)), key=lambda i: evals[i][loss_key])
    return {"epochs": epochs, "evals": evals, "smooth": smooth, "best": best, "plateau": plateau,
            "lowest_loss_epoch": epochs[lowest], "noise": P.noise_scale_by_part([m for m in metrics if "loss" in m]),
            "batch": plan["batch"], "total_epochs": plan["epochs"]}


def render(run_dir: Path, p: dict, select: str, report: str, margin: float, records: Path) -> str:
    env = read_json(run_dir / ENV) or {}
    rows = [f"| {e:g} | {m[select]:.4f} | {s:.4f} | {m[select.rsplit('/', 1)[0] + '/loss']:.4f} | "
            f"{m.get(report, float('nan')):.4f} |" for e, m, s in zip(p["epochs"], p["evals"], p["smooth"])]
    quarters = " | ".join(fmt_scale(q) for q in p["noise"])
    return "\n".join([
        f"# Budget probe: one base run (batch {p['batch']}) to {p['total_epochs']:g} epochs", "",
        f"- Validation {select} (mean of the last 3 evaluations) reaches {p['best']:.4f} at best; it is within "
        f"{margin:.0%} of that from epoch **{p['plateau']:g}** on (the plateau).",
        f"- The validation loss is lowest at epoch **{p['lowest_loss_epoch']:g}**; past it the model overfits in "
        "loss while the accuracy stays flat.",
        f"- B_simple by quarter of the run (samples): {quarters}. Batches far above it cannot hold the base's "
        "metric at a fixed epoch budget.",
        "- So a ladder read at the plateau and at the loss minimum covers the budgets that matter; longer runs add "
        "only overfitting.", "",
        f"Run: `{env.get('command', '?')}` (git {((env.get('git') or {}).get('sha') or '?')[:7]}); "
        f"Regenerate from the records copied here: `python scripts/budget_probe.py {rel(records)} --out "
        f"{rel(records.parent)}`.", "",
        f"| epoch | validation {select} | last-3 mean | validation loss | test {report} |", "|---|---|---|---|---|",
        *rows, ""])


def fmt_scale(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def plot(p: dict, select: str, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(p["epochs"], [m[select] for m in p["evals"]], lw=0.8, label=f"validation {select}")
    ax.plot(p["epochs"], p["smooth"], lw=1.5, label="last-3 mean")
    ax.axvline(p["plateau"], color="k", ls="--", lw=0.8, label="plateau")
    ax.axvline(p["lowest_loss_epoch"], color="tab:red", ls=":", lw=0.8, label="lowest validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel(select)
    ax.legend(fontsize=7)
    return save_figure(fig, path, 120)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--select", default="eval/accuracy")
    parser.add_argument("--report", default="test/accuracy")
    parser.add_argument("--margin", type=float, default=0.01)
    args = parser.parse_args(argv)
    p = probe(args.run, args.select, args.report, args.margin)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run.resolve() != (args.out / "run").resolve():
        copy_records({args.run: "run"}, args.out)
    atomic_write_text(args.out / "table.md", render(args.run, p, args.select, args.report, args.margin,
                                                    (args.out / "run").resolve()))
    plot(p, args.select, args.out / "curve.png")
    print(f"plateau at epoch {p['plateau']:g}, lowest validation loss at {p['lowest_loss_epoch']:g}: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
