"""Smith et al. 2017 at CPU scale: decay the lr, or grow the batch? `make batch-ramp`.

"Don't decay the learning rate, increase the batch size" (Smith, Kindermans, Ying and Le, arXiv 1711.00489):
where a step schedule divides the lr by 5, multiply the batch by 5 instead, at the same epochs. Same samples,
~5x fewer steps after each milestone, and (their CIFAR-10 and ImageNet runs) the same test accuracy. Here, on
MNIST-LSTM (Fashion-MNIST, the LEGW ladder's model and data, one LSTM layer of 64), three arms, same samples:

  - decay:    batch 128, lr 0.3, x0.2 at epochs 6 and 9 (schedule=step);
  - grow:     lr 0.3 held, batch 128 -> 640 -> 3200 at epochs 6 and 9 (batch_schedule=step, lr_rule=hold);
  - constant: batch 128, lr 0.3 throughout: the control that says whether decaying matters here at all.

Declared in advance: SGD + heavy-ball momentum 0.9 (Smith's optimizer), lr 0.3 at batch 128 (the SGD arm of
the LEGW warmup ablation, results/legw/warmup_ablation/, chose it for the 1x128 model on 49,152 images: the
largest lr of its grid within 1.5% of its best; not re-tuned here),
warmup 0.1 epochs, 12 epochs of 32,000 training images (a multiple of 3,200: every epoch is whole at every
batch), 5,000 validation images, the 10,000 test images, seeds 1-3. The table reports the mean of the last
3 evaluations (epochs 10-12: all in the last phase) of test accuracy and loss, mean [95% t interval], the
difference grow - decay with Welch's interval, and whether grow holds decay within 1% (relative) accuracy.

    python scripts/batch_ramp_smith.py [--report]

Runs live in outputs/batch_ramp/smith/ (rerun: finished runs are skipped, others resumed); the report and
each run's small records go to results/batch_ramp/smith/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one run, one thread (the machine is shared)

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch import protocol as P  # noqa: E402
from largebatch.drivers import Job, Runner, rel  # noqa: E402
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from largebatch.runfolder import SUMMARY, copy_records, read_json, read_metrics, read_plan, run_action  # noqa: E402
from largebatch.tracking import environment  # noqa: E402

TASK = ["experiment=mnist_lstm", "data=fashion_mnist", "data.valid_size=5000", "data.max_train=32000",
        "model.hidden=64", "optimizer=sgd", "optimizer.momentum=0.9", "optimizer.weight_decay=0.0",
        "optimizer.lr=0.3", "scaling=none", "batch=128", "micro_batch=128", "epochs=12", "schedule.warmup_epochs=0.1",
        "eval_every_epochs=1.0", "eval_batch=1000"]
MILESTONES, FACTOR = (6, 9), 5
ARMS = {
    "decay": (["schedule=step", f"schedule.milestones=[{MILESTONES[0]},{MILESTONES[1]}]", f"schedule.gamma={1 / FACTOR}"],
              f"batch 128; lr 0.3, x{1 / FACTOR:g} at epochs {MILESTONES[0]} and {MILESTONES[1]}"),
    "grow": (["schedule=constant", "batch_schedule=step",
              f"batch_schedule.milestones=[{MILESTONES[0]},{MILESTONES[1]}]", f"batch_schedule.factor={FACTOR}"],
             f"lr 0.3 held; batch 128 -> 640 -> 3200 at epochs {MILESTONES[0]} and {MILESTONES[1]}"),
    "constant": (["schedule=constant"], "batch 128; lr 0.3 throughout (the control)"),
}
SEEDS = (1, 2, 3)
LAST = 3  # evaluations averaged: epochs 10, 11, 12
MARGIN = 0.01  # relative to the decay arm's accuracy, as the other studies' verdicts
log = logging.getLogger("batch_ramp_smith")


def jobs(work: Path) -> dict[tuple[str, int], Job]:
    return {(arm, seed): Job([*TASK, *ARMS[arm][0], f"seed={seed}"], work / arm / f"seed={seed}")
            for arm in ARMS for seed in SEEDS}


def final(run_dir: Path, key: str) -> float | None:
    """The mean of a finished run's last evaluations of ``key``; None where it diverged or did not finish."""
    if run_action(run_dir) != "skip":
        return None
    evals = [m[key] for m in read_metrics(run_dir) if isinstance(m.get(key), (int, float)) and "loss" not in m]
    return sum(evals[-LAST:]) / len(evals[-LAST:]) if len(evals) >= LAST else None


def cell(values: list[float]) -> str:
    iv = P.t_interval(values)
    return iv.text() if iv else "—"


def gap_text(gap) -> str:
    return f"{gap.gap:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}]" if gap and gap.lo is not None else "—"


def curves_plot(table: dict, path: Path) -> None:
    """Test loss against samples seen and against optimizer steps, each arm's seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_samples, by_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"decay": "tab:blue", "grow": "tab:orange", "constant": "tab:gray"}
    for (arm, seed), job in table.items():
        points = [m for m in read_metrics(job.run_dir) if isinstance(m.get("test/loss"), (int, float))]
        label = arm if seed == SEEDS[0] else None
        by_samples.plot([m["samples"] for m in points], [m["test/loss"] for m in points], color=colours[arm],
                        label=label, alpha=0.8)
        by_steps.plot([m["step"] for m in points], [m["test/loss"] for m in points], color=colours[arm],
                      label=label, alpha=0.8)
    by_samples.set(xlabel="samples seen", ylabel="test loss", title="test loss vs samples (same budget)")
    by_steps.set(xlabel="optimizer step", ylabel="test loss", title="test loss vs optimizer steps")
    for ax in (by_samples, by_steps):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(table: dict, run_s: float) -> str:
    vals = {key: {m: final(job.run_dir, f"test/{m}") for m in ("accuracy", "loss")} | {
        "valid": final(job.run_dir, "eval/accuracy"),
        "steps": (read_json(job.run_dir / SUMMARY) or {}).get("steps"),
        "samples": (read_json(job.run_dir / SUMMARY) or {}).get("samples"),
        "plan": read_plan(job.run_dir)} for key, job in table.items()}
    by_arm = {arm: [v for (a, _), v in vals.items() if a == arm] for arm in ARMS}
    acc = {arm: [v["accuracy"] for v in rows if v["accuracy"] is not None] for arm, rows in by_arm.items()}
    loss = {arm: [v["loss"] for v in rows if v["loss"] is not None] for arm, rows in by_arm.items()}
    steps = {arm: sorted({v["steps"] for v in rows if v["steps"]}) for arm, rows in by_arm.items()}
    acc_gap = P.gap_interval(acc["grow"], acc["decay"], True)  # positive: grow worse
    loss_gap = P.gap_interval(loss["grow"], loss["decay"], False)
    margin = MARGIN * sum(acc["decay"]) / len(acc["decay"]) if acc["decay"] else None
    verdict = P.verdict(acc["grow"], acc["decay"], margin, True) if margin and len(acc["decay"]) >= 2 else None

    def paired(metric, first, second):
        """The t interval of (first - second) over the seeds where both finished (the arms share each seed's
        initialisation and first phase)."""
        return P.t_interval([vals[first, s][metric] - vals[second, s][metric] for s in SEEDS
                             if vals[first, s][metric] is not None and vals[second, s][metric] is not None])

    def diff(iv, how: str) -> str:
        """A difference's mean [95% interval] (how it was computed; whether it excludes 0)."""
        if iv is None or iv.lo is None:
            return "—"
        mean = iv.gap if isinstance(iv, P.Gap) else iv.mean
        side = "excludes 0" if iv.lo > 0 or iv.hi < 0 else "holds 0"
        return f"{mean:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}] ({how}; {side})"

    def steps_of(arm):
        return "/".join(str(s) for s in steps[arm]) or "—"

    heads = []
    loss_control = P.gap_interval(loss["constant"], loss["decay"], False)  # positive: constant worse
    acc_control = P.gap_interval(acc["constant"], acc["decay"], True)
    if verdict is None or acc_gap is None or loss_gap is None:
        heads.append("- Too few finished seeds for an interval yet.")
    else:
        far = max(abs(loss_gap.lo), abs(loss_gap.hi))
        decay_matters = loss_control is not None and loss_control.lo > 0
        if loss_gap.lo <= 0 <= loss_gap.hi:
            said = "no difference resolved"
            if decay_matters:
                said += (f"; the interval's far end ({far:.4f}) is {far / loss_control.gap:.0%} of what decaying the "
                         f"lr gains over the constant lr ({loss_control.gap:.4f})")
        else:
            said = f"growing the batch is {'worse' if loss_gap.lo > 0 else 'better'}"
        fewer = f"{1 - steps['grow'][0] / steps['decay'][0]:.0%} fewer" if steps["grow"] and steps["decay"] else ""
        acc_paired = paired("accuracy", "decay", "grow")
        if loss_gap.lo <= 0 <= loss_gap.hi and decay_matters and far < loss_control.gap:
            answer = (f"**Yes, within this study's resolution**: in test loss growing the batch matched decaying the lr "
                      f"(no difference resolved; the interval allows at most {far / loss_control.gap:.0%} of the decay's "
                      f"own gain over a constant lr), with {fewer} optimizer steps.")
            if acc_paired is not None and acc_paired.lo is not None and (acc_paired.lo > 0 or acc_paired.hi < 0):
                answer += (f" In test accuracy grow is {abs(acc_paired.mean):.4f} {'below' if acc_paired.mean > 0 else 'above'}"
                           f" decay, a gap {'only the seed pairing resolves' if acc_gap.lo <= 0 <= acc_gap.hi else 'resolved'}"
                           f", {'inside' if abs(acc_paired.hi) <= margin and abs(acc_paired.lo) <= margin else 'not inside'}"
                           f" the {MARGIN:.0%} margin.")
        elif loss_gap.lo > 0:
            answer = f"**No**: growing the batch ended at a higher test loss than decaying the lr, with {fewer} steps."
        else:
            answer = ("**Not shown**: no difference resolved in test loss, but the intervals are wide against what "
                      "the decay itself changes, so this study cannot say that the two match.")
        heads.append(f"- {answer}")
        heads.append(f"- **Test loss, grow vs decay (same samples)**: {cell(loss['grow'])} vs {cell(loss['decay'])}; "
                     f"grow - decay {diff(loss_gap, '95% Welch')}, {diff(paired('loss', 'grow', 'decay'), 'paired by seed')}"
                     f": {said}.")
        words = {"holds": f"grow holds decay within the {MARGIN:.0%} margin ({margin:.4f})",
                 "fails": f"grow gives up more than the {MARGIN:.0%} margin ({margin:.4f})",
                 "unresolved": f"unresolved against the {MARGIN:.0%} margin ({margin:.4f}) by Welch's interval"
                               + (f", ~{verdict.needs} seeds a cell would resolve it" if verdict.needs else "")}
        by_pairs = ""
        if acc_paired is not None and acc_paired.lo is not None:
            by_pairs = (f"; decay - grow {diff(acc_paired, 'paired by seed')}, "
                        + ("inside the margin" if acc_paired.hi <= margin else "not inside the margin"))
        heads.append(f"- **Test accuracy**: {cell(acc['grow'])} (grow) vs {cell(acc['decay'])} (decay); decay - grow "
                     f"{diff(acc_gap, '95% Welch')}: {words.get(verdict.word, verdict.word)}{by_pairs}.")
        samples = {arm: sorted({v["samples"] for v in rows if v["samples"]}) for arm, rows in by_arm.items()}
        heads.append(f"- **Optimizer steps**: grow {steps_of('grow')}, decay {steps_of('decay')} ({fewer}); samples "
                     f"trained: grow {'/'.join(f'{n:,}' for n in samples['grow'])}, decay "
                     f"{'/'.join(f'{n:,}' for n in samples['decay'])}.")
        if loss_control is not None and acc_control is not None:
            heads.append(f"- **Does decaying the lr matter here?** Against the constant-lr control, decay gains "
                         f"{diff(loss_control, '95% Welch')}, {diff(paired('loss', 'constant', 'decay'), 'paired')} in "
                         f"test loss; {diff(acc_control, '95% Welch')}, "
                         f"{diff(paired('accuracy', 'decay', 'constant'), 'paired')} in test accuracy. A match between "
                         "grow and decay says something only where the decay's own gain is resolved.")
    rows = ["| arm | what | optimizer steps | test accuracy | test loss | valid accuracy | seeds |", "|---|---|---|---|---|---|---|"]
    for arm, (_, what) in ARMS.items():
        valid = [v["valid"] for v in by_arm[arm] if v["valid"] is not None]
        rows.append(f"| {arm} | {what} | {steps_of(arm)} | {cell(acc[arm])} | {cell(loss[arm])} | {cell(valid)} | "
                    f"{len(acc[arm])} of {len(SEEDS)} |")
    plan = vals[("grow", SEEDS[0])]["plan"]
    phases = ", ".join(f"{p['batch']} for {p['epochs']:g} epochs ({p['total_steps']} steps)" for p in plan) or "—"
    noise = [P.noise_scale_by_part([m for m in read_metrics(table[("decay", s)].run_dir) if "loss" in m], 4)
             for s in SEEDS if run_action(table[("decay", s)].run_dir) == "skip"]
    quarters = [[q[i] for q in noise if q[i] is not None] for i in range(4)]
    quarter_means = [sum(q) / len(q) if q else None for q in quarters]
    noise_text = ", ".join(f"{q:.0f}" if q else "—" for q in quarter_means)
    top = FACTOR ** len(MILESTONES) * 128
    train = next(int(o.split("=")[1]) for o in TASK if o.startswith("data.max_train="))
    past = (f"the grow arm's last batch, {top}, is {top / quarter_means[-1]:.1f}x the last quarter's value"
            if quarter_means[-1] else "no estimate in the last quarter") + f" and 1/{train // top} of the training set"
    lines = [
        "# Decay the lr or grow the batch? (Smith et al. 2017 at CPU scale: MNIST-LSTM on Fashion-MNIST)", "",
        "## What this shows", "", *heads, "",
        f"Each cell: the mean of a run's last {LAST} evaluations (epochs 10-12, all in the last phase), mean [95% t "
        f"interval] over seeds {', '.join(map(str, SEEDS))}. The verdict reads the interval of decay - grow in test "
        f"accuracy against a margin of {MARGIN:.0%} of the decay arm's accuracy (non-inferiority: grow better than "
        "decay holds).", "",
        *rows, "",
        f"The grow arm's phases (lb-plan): {phases}.", "",
        "## Caveats", "",
        "- One small model and data set (a 1x64 LSTM on 32,000 Fashion-MNIST images, 12 epochs), one lr (the LEGW "
        "warmup ablation's SGD choice for the 1x128 model, not re-tuned), one factor (5) and two milestones, no "
        "tuning for either arm: Smith et al. ran wide ResNets on CIFAR-10 and Inception/ResNet on ImageNet.",
        f"- The gradient noise scale B_simple measured in the decay arm, by quarter of the run: {noise_text} "
        f"samples (the trainer's estimate, on log steps; seeds averaged); {past}. Smith's equivalence (the SGD "
        "noise scale g ~ lr x N / B, so lr / 5 = B x 5) is derived for batches well below the training set, and "
        "McCandlish et al. 2018 predict that past B_simple a larger batch buys little: the last phase tests the "
        "regime where the equivalence is weakest, in few steps.",
        "- Within a seed the three arms share the model's initialisation and their first 6 epochs exactly (the "
        "first phase of the grow arm is the constant-batch run's first 6 epochs, same data order); they differ "
        "only after the first milestone. The paired interval uses that; the verdict uses Welch's, as the other "
        "studies do.",
        "- Each phase of the grow arm draws its own permutation of the data (a new stage of the run); every phase "
        "here is whole epochs, so every epoch still sees every image once.",
        f"- Training time: {run_s / 60:.1f} min for all runs (one at a time, one torch thread, on a 2-core machine "
        "shared with other jobs).", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "outputs" / "batch_ramp" / "smith"))
    parser.add_argument("--out", default=str(REPO / "results" / "batch_ramp" / "smith"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--report", action="store_true", help="train nothing: render the runs finished so far")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    work, results = Path(args.work), Path(args.out)
    table = jobs(work)
    runner = Runner(work, jobs=1, threads=args.threads, checkpoint_every=2.0)
    with runner, runner.stop_on_signals():
        if not args.report:
            order = [table[arm, seed] for seed in SEEDS for arm in ARMS]  # a seed of every arm before the next seed
            runner.run_many(order)
    t0 = time.time()
    run_s = sum(float((read_json(p) or {}).get("wall_time_s") or 0.0) for p in work.glob(f"**/{SUMMARY}"))
    if results.exists():
        shutil.rmtree(results)
    copy_records({job.run_dir: job.run_dir.relative_to(work) for job in table.values() if job.run_dir.exists()},
                 results / "runs")
    text = render(table, run_s)
    atomic_write_text(results / "table.md", text)
    curves_plot(table, results / "curves.png")
    atomic_write_json(results / "provenance.json", {
        **environment(), "command": "python scripts/batch_ramp_smith.py" + (" --report" if args.report else ""),
        "overrides": {arm: [*TASK, *extra] for arm, (extra, _) in ARMS.items()}, "seeds": list(SEEDS),
        "last_evaluations": LAST, "margin": MARGIN, "run_seconds": round(run_s, 1), "threads": runner.threads,
        "work_folder": rel(work), "report_only": args.report, "rendered_in_s": round(time.time() - t0, 1)})
    print(text)
    return results


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:
        fail(error)
