"""LEGW's warmup against sqrt alone, where warmup can matter: `make legw-warmup-ablation`.

LEGW scales the lr by sqrt(k) AND the warmup's epochs by k (so its steps stay constant); the sqrt rule alone
keeps the base's warmup epochs (so its steps shrink k-fold). The ladder of scripts/reproduce_legw.py compares
the two at the base lr its sweep chose, the middle of the flat optimum, where a short warmup costs little. This
ablation puts the base near its stability edge, where the paper says warmup is what keeps large batches alive,
in two arms (MNIST-LSTM on Fashion-MNIST, the ladder's data and model):

  - adam: lr 0.01, the top of the committed sweep's grid (results/legw/mnist_lstm/sweep.json: 1.3% below its
    best at 20 epochs), so sqrt gives 0.04 at 2048 and 0.08 at 8192, past the tuned oracle's best there (0.048);
  - sgd:  SGD + heavy-ball momentum 0.9 (LEGW's LSTM setting is SGD-family), its lr the LARGEST of a grid whose
    validation accuracy is within 1.5% of the grid's best (seed 0), so the base sits at the high end.

Declared in advance: 12 epochs (the budget probe's plateau, results/legw/mnist_lstm_budget/), base warmup
0.09375 epochs (12/128: 36 steps at 128, 0.8% of the base run, the most for which LEGW's 64x warmup, 6
epochs, is half of the run), rungs 2048 (16x) and 8192 (64x), 3 seeds a cell, 2 at the base (all fresh:
never the sweep's seed 0). The table reports test accuracy (the mean of the last 3 evaluations), the
difference legw - sqrt with its Welch interval, and each cell's verdict against the base (margin 1%).

    python scripts/legw_warmup_ablation.py [--arm adam --arm sgd] [--report]

Runs live in outputs/legw/small/warmup_ablation/<arm>/ (rerun: finished runs are skipped, others resumed);
the report and each run's small records go to results/legw/warmup_ablation/. --report renders from the runs
finished so far (cells with fewer seeds say so).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch import protocol as P  # noqa: E402
from largebatch.drivers import Job, Runner, rel  # noqa: E402
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from largebatch.report import ladder as L  # noqa: E402
from largebatch.runfolder import copy_records, read_json, read_metrics, read_plan, run_action  # noqa: E402
from largebatch.tracking import environment  # noqa: E402

TASK = ["experiment=mnist_lstm", "data=fashion_mnist", "data.valid_size=5000", "data.max_train=49152",
        "eval_every_epochs=1.0", "eval_batch=1000"]
EPOCHS = 12.0
BASE, RUNGS = 128, (8192, 2048)  # the top rung first: it is the question
WARMUP = EPOCHS / BASE  # 0.09375 epochs: LEGW's warmup at 64x is half the run
SEEDS, BASE_SEEDS = (1, 2, 3), (1, 2)
MARGIN = 0.01  # relative to the base's accuracy, as the ladder's verdicts
LAST = 3
SGD_GRID = (0.03, 0.1, 0.3, 1.0)
SGD_WITHIN = 0.015  # the sgd arm's lr: the largest of the grid within 1.5% of its best validation accuracy
ARMS = {
    "adam": dict(optimizer=["optimizer=adam", "optimizer.weight_decay=0.0"], lr=0.01,
                 why="the top of the committed 20-epoch sweep's grid (1e-3, 3e-3, 1e-2), 1.3% below its best"),
    "sgd": dict(optimizer=["optimizer=sgd", "optimizer.momentum=0.9", "optimizer.weight_decay=0.0"], lr=None,
                why=f"the largest of {list(SGD_GRID)} within {SGD_WITHIN:.1%} of the grid's best validation accuracy "
                "(seed 0, LEGW's warmup at the base)"),
}
RULE_NAMES = {"legw": "sqrt + LEGW warmup (epochs x k)", "sqrt": "sqrt, the base's warmup epochs"}
log = logging.getLogger("legw_warmup_ablation")


def overrides(arm: str, rule: str, lr: float, batch: int, seed: int) -> list[str]:
    return [*TASK, f"epochs={EPOCHS:g}", *ARMS[arm]["optimizer"], f"scaling={rule}", f"scaling.ref_batch={BASE}",
            f"optimizer.lr={lr:g}", f"schedule.warmup_epochs={WARMUP:g}", f"batch={batch}", f"seed={seed}"]


def final(run_dir: Path, key: str) -> float | None:
    """The mean of a finished run's last 3 evaluations of ``key``; None where it diverged or did not finish."""
    return L.value_of(read_metrics(run_dir), key, LAST) if run_action(run_dir) == "skip" else None


def sgd_lr(runner: Runner, work: Path) -> tuple[float, dict]:
    jobs = {lr: Job(overrides("sgd", "legw", lr, BASE, 0), work / "sgd" / "sweep" / f"lr={lr:g}") for lr in SGD_GRID}
    runner.run_many(list(jobs.values()))
    scores = {lr: final(job.run_dir, "eval/accuracy") for lr, job in jobs.items()}
    finite = {lr: s for lr, s in scores.items() if s is not None}
    if not finite:
        raise LargebatchError("every sgd sweep run diverged: widen SGD_GRID downwards")
    best = max(finite.values())
    chosen = max(lr for lr, s in finite.items() if s >= best * (1 - SGD_WITHIN))
    return chosen, {f"{lr:g}": s for lr, s in scores.items()}


def arm_jobs(arm: str, lr: float, work: Path, rungs=RUNGS) -> dict:
    jobs = {("base", BASE, s): Job(overrides(arm, "legw", lr, BASE, s), work / arm / "runs" / "base" / f"batch={BASE},seed={s}")
            for s in BASE_SEEDS}
    for b in rungs:
        for rule in RULE_NAMES:
            for s in SEEDS:
                jobs[rule, b, s] = Job(overrides(arm, rule, lr, b, s), work / arm / "runs" / rule / f"batch={b},seed={s}")
    return jobs


def interval_text(values: list[float], diverged: int) -> str:
    iv = P.t_interval(values)
    text = iv.text() if iv else "—"
    return text + (f", {diverged} diverged" if diverged else "")


def render(arms: dict, results: Path, elapsed_s: float) -> str:
    """table.md: per arm, the cells, the legw - sqrt difference with its interval, the verdicts."""
    lines = [f"# LEGW's warmup against sqrt alone (MNIST-LSTM, Fashion-MNIST, {EPOCHS:g} epochs)", ""]
    heads, body = [], []
    for arm, a in arms.items():
        if not a["jobs"]:
            continue
        vals = {key: final(job.run_dir, "test/accuracy") for key, job in a["jobs"].items()}
        done = {key for key, job in a["jobs"].items() if run_action(job.run_dir) in ("skip", "diverged")}
        base = [v for (row, _, _), v in vals.items() if row == "base" and v is not None]
        margin = MARGIN * (sum(base) / len(base)) if base else None
        body += [f"## {arm}: lr {a['lr']:g} at batch {BASE} ({a['why']})", ""]
        body.append(f"Base (batch {BASE}, warmup {WARMUP:g} epochs = {WARMUP * a['spe'][BASE]:.0f} steps): test accuracy "
                    f"{interval_text(base, 0)}.")
        body += ["", "| batch | k | lr | " + " | ".join(f"{RULE_NAMES[r]}: warmup steps, test accuracy, verdict"
                                                      for r in RULE_NAMES) + " | legw - sqrt [95% Welch] |",
                 "|---|---|---|---|---|---|"]
        for b in sorted(RUNGS):
            k = b // BASE
            cells, per_rule = [], {}
            for rule in RULE_NAMES:
                keys = [key for key in a["jobs"] if key[:2] == (rule, b)]
                v = [vals[key] for key in keys if vals[key] is not None]
                diverged = sum(1 for key in keys if key in done and vals[key] is None)
                per_rule[rule] = v
                steps = WARMUP * (k if rule == "legw" else 1) * a["spe"][b]
                verdict = P.verdict(v, base, margin, True) if base and len(base) >= 2 and (v or diverged) else None
                cells.append(f"{steps:.1f} steps, {interval_text(v, diverged)}"
                             + (f" {verdict.mark} {verdict.text()}" if verdict else ""))
            gap = P.gap_interval(per_rule["sqrt"], per_rule["legw"], True)  # positive: legw better
            diff = (f"{gap.gap:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}]" if gap and gap.lo is not None else "—")
            body.append(f"| {b} | {k} | {a['lr'] * k ** 0.5:.4g} | " + " | ".join(cells) + f" | {diff} |")
            a.setdefault("gaps", {})[b] = gap
        body.append("")
    for arm, a in arms.items():
        for b, gap in sorted(a.get("gaps", {}).items(), reverse=True):
            if gap is None:
                heads.append(f"- **{arm}, batch {b}**: not run, or too few finished seeds for an interval.")
            elif gap.lo > 0:
                heads.append(f"- **{arm}, batch {b}**: LEGW's warmup is better than sqrt alone by {gap.gap:.4f} "
                             f"[{gap.lo:.4f}, {gap.hi:.4f}] test accuracy: warmup-in-epochs matters here.")
            elif gap.hi < 0:
                heads.append(f"- **{arm}, batch {b}**: sqrt alone is better than LEGW's warmup by {-gap.gap:.4f} "
                             f"[{-gap.hi:.4f}, {-gap.lo:.4f}]: the long warmup costs more than it saves here.")
            else:
                needs = P.seeds_needed(gap, 0.0)  # for the interval of the difference to exclude 0
                heads.append(f"- **{arm}, batch {b}**: no difference resolved (legw - sqrt {gap.gap:+.4f} "
                             f"[{gap.lo:+.4f}, {gap.hi:+.4f}]; "
                             + (f"~{needs} seeds a cell would resolve it" if needs else "more than 100 seeds a cell")
                             + ").")
    lines += ["## What this shows", "", *heads, "",
              f"Each cell: test accuracy, the mean of the last {LAST} evaluations, mean [95% t interval] over fresh "
              f"seeds; ✓/✗/? the interval verdict of the cell's gap to its arm's base within {MARGIN:.0%}. "
              "The difference column is legw minus sqrt (positive: LEGW's warmup helps), Welch's interval. "
              "A diverged seed (a non-finite loss) has no accuracy and is counted beside the cell.",
              f"Training time of the runs so far: {elapsed_s / 60:.1f} min, the sum of their wall times at one torch "
              "thread each (one or two at a time on 2 cores shared with other work).", "",
              *body]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=list(ARMS), action="append", help="an arm (repeat; default: both)")
    parser.add_argument("--work", default=str(REPO / "outputs" / "legw" / "small" / "warmup_ablation"))
    parser.add_argument("--out", default=str(REPO / "results" / "legw" / "warmup_ablation"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads a run (default: cores / jobs)")
    parser.add_argument("--rungs", default=",".join(map(str, RUNGS)), help="the rungs to train (default: both); "
                        "the report shows every rung with finished runs")
    parser.add_argument("--report", action="store_true", help="train nothing: render the runs finished so far")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    work, results = Path(args.work), Path(args.out)
    runner = Runner(work, jobs=args.jobs, threads=args.threads, checkpoint_every=2.0)
    arms = {arm: dict(ARMS[arm], jobs={}) for arm in args.arm or list(ARMS)}
    record = {}
    with runner, runner.stop_on_signals():
        for arm, a in arms.items():
            if arm == "sgd":
                sweep_done = all(run_action(work / "sgd" / "sweep" / f"lr={lr:g}") in ("skip", "diverged")
                                 for lr in SGD_GRID)
                if args.report and not sweep_done:
                    continue
                a["lr"], record["sgd_sweep"] = sgd_lr(runner, work)
                log.info("sgd arm: lr %g (validation accuracy by lr: %s)", a["lr"], record["sgd_sweep"])
            a["jobs"] = arm_jobs(arm, a["lr"], work)
            if not args.report:
                wanted = {int(b) for b in args.rungs.split(",")} | {BASE}
                runner.run_many([job for (_, b, _), job in a["jobs"].items() if b in wanted])
    t0 = time.time()
    spe = {}
    for a in arms.values():
        for (_, b, _), job in a["jobs"].items():
            plan = read_plan(job.run_dir)
            if plan:
                spe[b] = plan[-1]["steps_per_epoch"]
    for a in arms.values():
        a["spe"] = {b: spe.get(b, 49152 // b) for b in (BASE, *RUNGS)}
    run_s = sum(float((read_json(p) or {}).get("wall_time_s") or 0.0) for p in work.glob("**/summary.json"))
    if results.exists():
        shutil.rmtree(results)
    folders = {job.run_dir: job.run_dir.relative_to(work) for a in arms.values() for job in a["jobs"].values()
               if job.run_dir.exists()}
    folders.update({p.parent: p.parent.relative_to(work) for p in work.glob("sgd/sweep/*/summary.json")})
    copy_records(folders, results / "runs")
    text = render(arms, results, run_s)
    atomic_write_text(results / "table.md", text)
    atomic_write_json(results / "provenance.json", {
        "command": "python scripts/legw_warmup_ablation.py" + "".join(f" --arm {a}" for a in args.arm or []),
        "epochs": EPOCHS, "base_batch": BASE, "rungs": list(RUNGS), "base_warmup_epochs": WARMUP, "seeds": list(SEEDS),
        "base_seeds": list(BASE_SEEDS), "margin": MARGIN, "lrs": {arm: a["lr"] for arm, a in arms.items()},
        "arm_choice": {arm: a["why"] for arm, a in arms.items()}, **record, "run_seconds": round(run_s, 1),
        "threads_per_job": runner.threads, "jobs": runner.jobs, "work_folder": rel(work),
        "report_only": args.report, "rendered_in_s": round(time.time() - t0, 1), **environment()})
    print(text)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except LargebatchError as error:
        fail(error)
