"""Reproduce LEGW's claims (arXiv 1901.08256): `make reproduce-legw TASK=ptb|mnist_lstm|seq2seq|resnet SCALE=...`.

LEGW: with the lr scaled by sqrt(k) and the warmup's EPOCHS by k when the batch grows k-fold (so the warmup's
steps stay constant), LSTM batches scale 64x (GNMT 16x) at a fixed epoch budget without tuning, where linear
scaling (lr x k, Goyal's recipe) does not. The same protocol for every workload (``--task``):

  1. one base configuration at the base batch: the lr from a half-decade grid at the base's warmup, widened
     past an edge until the best is interior (:func:`largebatch.drivers.widening_sweep`); then the warmup, in
     epochs, from a small grid at that lr, widened the same way (doubling, down to 0, up to what the top rung
     can hold: LEGW multiplies it by the ladder's k). Scored by the task's ``metric`` in TASKS (eval/ppl for
     the LMs and seq2seq, eval/accuracy); every value tried goes to ``sweep.json``. Its runs have the full budget, so
     the chosen one is the base rung's first seed.
  2. untuned, the ladder k = batch / base batch under each rule: legw (lr x sqrt k, warmup epochs x k),
     sqrt (lr x sqrt k), linear (lr x k) and none; the rules are identical at k = 1, so the base rung is run
     once and shared. Seeds: ``seeds`` on the base and top rungs, one elsewhere. Every rung trains on the
     same samples in the same order (a training set cut to a multiple of the top batch), except the stateful
     PTB LM, whose streams depend on the batch.
  3. the report (:mod:`largebatch.report.legw`): runs.csv, table.md, metric_vs_batch.png,
     steps_to_target.png, provenance.json and each run's small records, in ``results/legw/<task>/``
     (SCALE=smoke: outputs/legw_smoke/<task>/, never results/).

Runs go to a pool of ``--jobs`` worker processes, longest first, and live in outputs/legw/<scale>/<task>/
(--work for another folder). Run again with the same arguments, it skips finished runs, keeps diverged ones
and resumes the others from their newest checkpoint (as scripts/reproduce_table1.py does).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.config import compose  # noqa: E402
from largebatch.drivers import (  # noqa: E402
    CHECKPOINT_EVERY_EPOCHS,
    Clock,
    DriverStopped,
    Job,
    Runner,
    copy_run_records,
    finite_or_inf,
    next_lr,
    rel,
    widening_sweep,
)
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.report import legw as legw_report  # noqa: E402
from largebatch.report.runs import read_json  # noqa: E402

RULES = ("legw", "sqrt", "linear", "none")

# The workloads: the config that picks each, its primary metric (as in largebatch/tasks/*.py `primary`) and
# the tolerance of the report's noise band, relative to the base rung's metric (the band is the larger of
# this and 2 x the pooled seed std; BLEU at these scales is a few points, so 1% of it is below its noise).
# In this order a call without --task runs them (together, the first first: see main).
TASKS = {
    "mnist_lstm": dict(base=["experiment=mnist_lstm", "data=fashion_mnist"], metric="eval/accuracy",
                       higher_is_better=True, tolerance=0.01,
                       paper="MNIST-LSTM: batch 128 -> 8192 (64x) at the base's accuracy"),
    "ptb": dict(base=["experiment=ptb_zaremba_small"], metric="eval/ppl", higher_is_better=False, tolerance=0.01,
                paper="PTB small LSTM (Zaremba): batch 20 -> 1280 (64x) at the base's perplexity"),
    "resnet": dict(base=["experiment=resnet20_fashion", "schedule.warmup_init_lr=0.0"], metric="eval/accuracy",
                   higher_is_better=True, tolerance=0.01,
                   paper="ImageNet ResNet-50 in LEGW's appendix; here ResNet-20 on Fashion-MNIST, 32x"),
    # Valid token perplexity, not GNMT's BLEU: the models these budgets train score BLEU below 1, which is noise
    # (experiments/legw/README.md); every run still logs its greedy valid BLEU beside the perplexity.
    "seq2seq": dict(base=["model=seq2seq", "data=verses"], metric="eval/ppl", higher_is_better=False,
                    tolerance=0.01, paper="GNMT: batch 128 -> 2048 (16x) at the base's BLEU; here 32 -> 512, "
                    "scored by valid perplexity (BLEU is ~0 at this scale)"),
}

# Per scale and task: ``train`` (overrides of every run), ``ladder`` (base first), ``seeds`` (on the base and
# top rungs), ``lr_grid``/``max_widen`` (the lr sweep at ``warmup``), ``warmup_grid`` (epochs; widened by
# doubling up to epochs / k_top, the longest warmup LEGW can scale to the top rung). The small scale's costs
# and plans: experiments/legw/README.md.
SCALES = {
    "smoke": dict(  # seconds per task; tests/test_reproduce_legw.py runs it
        results="outputs/legw_smoke", jobs=1, seeds=1, max_widen=0, checkpoint_every=0.5,
        tasks={
            "ptb": dict(train=["scale=tiny", "model.dropout=0", "epochs=1", "eval_every_epochs=0.5",
                               "schedule.decay_start_epoch=0.5"],
                        ladder=[4, 16], lr_grid=[0.3, 1.0], warmup=0.0, warmup_grid=[0.0, 0.03]),
            "mnist_lstm": dict(train=["scale=tiny", "data.max_train=512", "epochs=1", "eval_every_epochs=0.5"],
                               ladder=[16, 64], lr_grid=[1e-3, 3e-3], warmup=0.0, warmup_grid=[0.0, 0.1]),
            "seq2seq": dict(train=["scale=tiny", "data.max_train=128", "epochs=1", "eval_every_epochs=0.5"],
                            ladder=[8, 32], lr_grid=[1e-3, 3e-3], warmup=0.0, warmup_grid=[0.0, 0.1]),
            "resnet": dict(train=["scale=tiny", "data.max_train=256", "epochs=1", "eval_every_epochs=0.5",
                                  "schedule.milestones=[0.5]"],
                           ladder=[16, 64], lr_grid=[0.03, 0.1], warmup=0.0, warmup_grid=[0.0, 0.1]),
        }),
    "small": dict(  # the committed results: each task <= 90 min on 2 cores, 239 min in all (measured)
        results="results/legw", seeds=2, max_widen=3,
        tasks={
            # 1 epoch of full PTB (Zaremba: 13), at the peak lr throughout as Zaremba's first (he keeps the peak
            # for 4 of 13 epochs, then x0.5 per epoch); 36 steps at batch 1280. A 2-epoch run took ~13 min at batch 20
            # on one thread, and larger rungs cost about as much per token (the 10k-word softmax dominates): 2
            # epochs would take ~160 min of the machine, past the 90-minute budget; 1 epoch ~80.
            "ptb": dict(train=["epochs=1", "eval_every_epochs=0.25", "micro_batch=80"],
                        ladder=[20, 80, 320, 640, 1280], lr_grid=[0.3, 1.0, 3.0], warmup=0.0,
                        warmup_grid=[0.0, 0.0078125, 0.015625]),
            # 15 epochs of 57,344 Fashion-MNIST images (7 x 8192): 105 steps at batch 8192.
            "mnist_lstm": dict(train=["epochs=15", "data.max_train=57344", "eval_every_epochs=1.0"],
                               ladder=[128, 512, 1024, 2048, 4096, 8192], lr_grid=[3e-4, 1e-3, 3e-3], warmup=0.0,
                               warmup_grid=[0.0, 0.05, 0.1]),
            # 2x128 on 4,096 verse pairs (8 x 512: the first 4,097 less the one over 80 BPE tokens, measured) for
            # 2 epochs: 16 steps at batch 512; 200 valid pairs, no beam-search test decode. Every rung runs
            # micro-batches of 32: a micro-batch of 512 trains fewer pairs a second on this CPU, not more (its
            # 512 x 80 x 8,000 logits). 2x256 on 16,384 pairs, the first plan, ran 21 pairs/s: ~26 min a run.
            "seq2seq": dict(train=["scale=small", "model.hidden=128", "data.max_train=4097", "data.max_eval=200",
                                   "epochs=2", "eval_every_epochs=0.5", "micro_batch=32", "final_eval=false"],
                            ladder=[32, 64, 128, 256, 512], lr_grid=[3e-4, 1e-3, 3e-3], warmup=0.0,
                            warmup_grid=[0.0, 0.03125, 0.0625]),
            # ResNet-20 on 12,288 Fashion-MNIST images (6 x 2048) for 5 epochs (x0.1 at 1/3, 2/3 and 8/9 of them,
            # as Goyal's 30/60/80 of 90): 30 steps at batch 2048; 2,000 test images per eval.
            "resnet": dict(train=["epochs=5", "data.max_train=12288", "schedule.milestones=[1.667,3.333,4.444]",
                                  "eval_every_epochs=0.5", "eval_max_batches=4"],
                           ladder=[64, 256, 512, 1024, 2048], lr_grid=[0.03, 0.1, 0.3], warmup=0.04,
                           warmup_grid=[0.0, 0.04, 0.08]),
        }),
    "gpu": dict(  # one CUDA device, each run planned for < 10 min on an H100 (never run yet)
        results="results/legw_gpu", seeds=2, max_widen=3, jobs=1, checkpoint_every=1.0,
        tasks={
            "ptb": dict(train=["eval_every_epochs=0.5", "micro_batch=1280"],  # Zaremba's 13 epochs
                        ladder=[20, 80, 160, 320, 640, 1280], lr_grid=[0.3, 1.0, 3.0], warmup=0.0,
                        warmup_grid=[0.0, 0.05, 0.1]),
            "mnist_lstm": dict(train=["epochs=50", "data.max_train=57344", "micro_batch=8192"],
                               ladder=[128, 256, 512, 1024, 2048, 4096, 8192], lr_grid=[3e-4, 1e-3, 3e-3],
                               warmup=0.0, warmup_grid=[0.0, 0.2, 0.4]),
            # 28,672 pairs (56 x 512) after the length filter: 28,754 kept 28,673 (measured), so 28,753
            "seq2seq": dict(train=["scale=small", "data.max_train=28753", "epochs=8", "eval_every_epochs=0.5",
                                   "micro_batch=512"],
                            ladder=[32, 64, 128, 256, 512], lr_grid=[3e-4, 1e-3, 3e-3], warmup=0.0,
                            warmup_grid=[0.0, 0.125, 0.25]),
            "resnet": dict(train=["epochs=24", "data.max_train=57344", "schedule.milestones=[8.0,16.0,21.333]",
                                  "eval_every_epochs=1.0", "micro_batch=128"],
                           ladder=[64, 128, 256, 512, 1024, 2048, 4096], lr_grid=[0.03, 0.1, 0.3], warmup=0.1875,
                           warmup_grid=[0.0, 0.1875, 0.375]),
        }),
}
log = logging.getLogger("reproduce_legw")


def rule_overrides(rule: str, base_batch: int, lr: float, warmup_epochs: float) -> list[str]:
    """The untuned scaling of the base configuration to any batch: ``rule`` from ``base_batch``."""
    return [f"scaling={rule}", f"scaling.ref_batch={base_batch}", f"optimizer.lr={lr:g}",
            f"schedule.warmup_epochs={warmup_epochs:g}"]


def run_overrides(task: str, scale: dict, rule: str, batch: int, lr: float, warmup: float, seed: int) -> list[str]:
    """Every override of one run of ``task`` (the rule's scaling from the base batch, at ``batch``)."""
    spec = scale["tasks"][task]
    return [*TASKS[task]["base"], *spec["train"], *rule_overrides(rule, spec["ladder"][0], lr, warmup),
            f"batch={batch}", f"seed={seed}"]


def score(task: str, summary: dict | None) -> float:
    """A sweep's score of a run, lower is better: the primary metric, negated where higher is better."""
    value = finite_or_inf((summary or {}).get(TASKS[task]["metric"]))
    return -value if TASKS[task]["higher_is_better"] and value != float("inf") else value


def sweep_dir(work: Path, lr: float, warmup: float) -> Path:
    return work / "sweep" / f"lr={lr:g},warmup={warmup:g}"


def warmup_step(limit: float):
    """The warmup grid's next value past an edge: doubled (at most ``limit``, the longest warmup the top rung
    can hold under LEGW), halved, or 0 below the smallest positive value; None where it cannot go further."""

    def step(value: float, up: bool) -> float | None:
        if up:
            beyond = min(2 * value, limit) if value > 0 else limit / 4
            return beyond if beyond > value else None
        if value <= 0:
            return None
        return value / 2 if value / 2 >= limit / 64 else 0.0

    return step


def sweep_base(runner: Runner, task: str, scale: dict, work: Path) -> tuple[float, float, dict]:
    """The base configuration: (lr, warmup epochs, the sweep's record). The lr first, at the base's warmup,
    then the warmup at the chosen lr, each by a widening grid scored by the task's primary metric."""
    spec = scale["tasks"][task]
    base = spec["ladder"][0]
    epochs = runner.epochs(task)
    limit = epochs / (spec["ladder"][-1] / base)  # LEGW's warmup at the top rung may not outlast the run

    def run_at(pairs: list[tuple[float, float]]) -> list[float]:
        jobs = [Job(run_overrides(task, scale, "legw", base, lr, w, 0), sweep_dir(work, lr, w)) for lr, w in pairs]
        return [score(task, s) for s in runner.run_many(jobs)]

    lrs = widening_sweep({task: list(spec["lr_grid"])}, lambda todo: run_at([(lr, spec["warmup"]) for _, lr in todo]),
                         max_widen=scale["max_widen"], step=next_lr)[task]
    lr = lrs["chosen"]
    grid = sorted({*spec["warmup_grid"], spec["warmup"]} - {w for w in spec["warmup_grid"] if w > limit})
    warmups = widening_sweep({task: grid}, lambda todo: run_at([(lr, w) for _, w in todo]),
                             max_widen=scale["max_widen"], step=warmup_step(limit),
                             known={task: {spec["warmup"]: lrs["scores"][lr]}})[task]
    warmup = warmups["chosen"]
    sign = -1 if TASKS[task]["higher_is_better"] else 1
    record = {
        "task": task, "batch": base, "epochs": epochs, "metric": TASKS[task]["metric"],
        "lr": {"at_warmup_epochs": spec["warmup"], "initial_grid": spec["lr_grid"], "chosen": lr,
               "interior": lrs["interior"], "metric_by_lr": {f"{v:g}": sign * s for v, s in lrs["scores"].items()}},
        "warmup_epochs": {"at_lr": lr, "initial_grid": grid, "limit": limit, "chosen": warmup,
                          "interior": warmups["interior"],
                          "metric_by_warmup": {f"{v:g}": sign * s for v, s in warmups["scores"].items()}},
    }
    log.info("%s base: lr %g (%s), warmup %g epochs (%s)", task, lr, "interior" if lrs["interior"] else "AT AN EDGE",
             warmup, "interior" if warmups["interior"] else "at an edge")
    return lr, warmup, record


class LegwRunner(Runner):
    """The pool runner, with the epoch budget of a task's runs at hand (for the warmup grid's limit)."""

    def __init__(self, *args, scale: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def epochs(self, task: str) -> float:
        spec = self.scale["tasks"][task]
        return float(compose([*TASKS[task]["base"], *spec["train"]]).epochs)


def ladder_jobs(task: str, scale: dict, work: Path, lr: float, warmup: float, seeds: list[int]) -> dict:
    """{(rule, batch, seed): Job} of the ladder; the base rung (every rule's k = 1) is "base", its seed 0 the
    sweep's chosen run (the same config)."""
    ladder = scale["tasks"][task]["ladder"]
    jobs = {("base", ladder[0], 0): Job(run_overrides(task, scale, "legw", ladder[0], lr, warmup, 0),
                                        sweep_dir(work, lr, warmup))}
    for s in seeds[1:]:
        jobs["base", ladder[0], s] = Job(run_overrides(task, scale, "legw", ladder[0], lr, warmup, s),
                                         work / "runs" / "base" / f"batch={ladder[0]},seed={s}")
    for rule in RULES:
        for b in ladder[1:]:
            for s in seeds if b == ladder[-1] else seeds[:1]:
                if rule == "legw" and warmup == 0:  # k x 0 epochs: LEGW is sqrt, the same runs (run once)
                    jobs[rule, b, s] = Job(run_overrides(task, scale, "sqrt", b, lr, warmup, s),
                                           work / "runs" / "sqrt" / f"batch={b},seed={s}")
                    continue
                jobs[rule, b, s] = Job(run_overrides(task, scale, rule, b, lr, warmup, s),
                                       work / "runs" / rule / f"batch={b},seed={s}")
    return jobs


def reproduce_task(task: str, args, scale: dict, runner: LegwRunner, work: Path, results: Path,
                   clock: Clock, together: list[str] = ()) -> Path:
    """Sweep, ladder and report of one workload; returns its results folder."""
    seeds = list(range(args.seeds if args.seeds is not None else scale["seeds"]))
    lr, warmup, record = sweep_base(runner, task, scale, work)
    jobs = ladder_jobs(task, scale, work, lr, warmup, seeds)
    runner.run_many(list({job.run_dir: job for job in jobs.values()}.values()))  # a folder shared by rules: once
    # A call that found every run finished only re-renders: it neither counts as a call nor shared the workers.
    # The workers' other tasks in this call: those that started a run in it too (so far; a task that only
    # rendered its table did not share them).
    def trained_in_this_call(name: str) -> bool:
        return any(run_dir.is_relative_to(work.parent / name) for run_dir in runner.started)

    if trained_in_this_call(task):
        clock.shared_with.update(t for t in together if t != task and trained_in_this_call(t))
    else:
        clock.idle()
    others = sorted(clock.shared_with)
    if results.exists():
        shutil.rmtree(results)
    entries = [{"rule": rule, "batch": b, "seed": s, "dir": job.run_dir,
                "record": f"runs/{rule}/batch={b},seed={s}"} for (rule, b, s), job in jobs.items()]
    for e in entries:  # one by one: with no base warmup a sqrt run is also the legw rung's
        copy_run_records({e["dir"]: e["record"]}, results)
    atomic_write_json(results / "sweep.json", record)
    # Training time of every run of the task (sweep included), from the runs' own summaries, and the driver's
    # elapsed time: run with other tasks, it shares the workers with them, so the first is the task's cost.
    run_s = sum(float(s.get("wall_time_s") or 0.0) for s in map(read_json, [*work.glob("sweep/*/summary.json"),
                                                                         *work.glob("runs/*/*/summary.json")])
                if isinstance(s, dict))
    legw_report.write_legw_report(
        [{**e, "dir": results / e["record"]} for e in entries], results, task=task, metric=TASKS[task]["metric"],
        higher_is_better=TASKS[task]["higher_is_better"], tolerance=TASKS[task]["tolerance"],
        title=f"LEGW at reduced scale ({args.scale}): {task}, {run_s / 60:.1f} min of training in all ({runner.jobs} "
        f"at a time: {run_s / 60 / runner.jobs:.1f} min of the machine), {clock.total_s() / 60:.1f} min of the driver"
        + (f" over {clock.calls} calls (it resumes)" if clock.calls > 1 else "")
        + (f", sharing its workers with {', '.join(others)}" if others else ""),
        claim=TASKS[task]["paper"],
        provenance={"command": f"make reproduce-legw TASK={task} SCALE={args.scale}", "base_lr": lr,
                    "wall_time_s": round(clock.total_s(), 1), "calls": clock.calls, "jobs": runner.jobs,
                    "run_seconds": round(run_s, 1), "run_together_with": others,
                    "threads_per_job": runner.threads,
                    "base_warmup_epochs": warmup, "seeds": seeds, "work_folder": rel(work),
                    "sweep": record, "steps": [s for s in runner.steps if s.get("run_dir", "").startswith(rel(work) + "/")]})
    log.info("%s: %s", task, rel(results))
    return results


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), action="append",
                        help="a workload (repeat for several; default: all four)")
    parser.add_argument("--scale", choices=list(SCALES), default="small")
    parser.add_argument("--seeds", type=int, default=None, help="seeds on the base and top rungs (default: the "
                        "scale's: 2, 1 at smoke)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the scale's, else one "
                        "per core, one torch thread each)")
    parser.add_argument("--out", help="results root, one folder per task below it (default: the scale's)")
    parser.add_argument("--work", help="runs root (default: outputs/legw/<scale>); a second call with the same "
                        "folder skips finished runs and resumes unfinished ones")
    args = parser.parse_args(argv)
    if args.scale == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("SCALE=gpu trains on one CUDA device and this machine has none; its plans: "
                     "experiments/legw/README.md")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    scale = SCALES[args.scale]
    work_root = Path(args.work) if args.work else REPO / "outputs" / "legw" / args.scale
    out_root = Path(args.out) if args.out else REPO / scale["results"]
    jobs = args.jobs or scale.get("jobs") or os.cpu_count() or 1
    runner = LegwRunner(work_root, jobs=jobs, scale=scale,
                        checkpoint_every=scale.get("checkpoint_every", CHECKPOINT_EVERY_EPOCHS))
    tasks = args.task or list(TASKS)
    # Composing a task's configs takes seconds: let every task queue its first runs before the pool takes one,
    # or the quickest to compose, not the first, gets the workers.
    runner.settle_s = 20.0 if len(tasks) > 1 else 0.0

    concurrent = runner.jobs > 1 and len(tasks) > 1  # one after another, tasks share neither workers nor time

    def one(i: int, task: str) -> Path:
        work = work_root / task
        clock = Clock(work / "driver_time.json", autosave_s=60)
        try:
            with runner.priority(i):
                return reproduce_task(task, args, scale, runner, work, out_root / task, clock,
                                      together=tasks if concurrent else [])
        finally:
            clock.stop()

    with runner, runner.stop_on_signals():
        if not concurrent:
            return [one(i, task) for i, task in enumerate(tasks)]
        # One thread per task, one shared pool: the first task's runs go first, the later tasks' runs fill the
        # workers it leaves idle (its sweep's rounds of 1-3 runs); a task that fails does not stop the others.
        with ThreadPoolExecutor(len(tasks), thread_name_prefix="task") as threads:
            futures = [threads.submit(one, i, task) for i, task in enumerate(tasks)]
        failed = [(task, f.exception()) for task, f in zip(tasks, futures) if f.exception() is not None]
        if any(isinstance(error, DriverStopped) for _, error in failed):
            raise next(error for _, error in failed if isinstance(error, DriverStopped))  # one line, not one a task
        for task, error in failed:
            log.error("%s failed: %s: %s", task, type(error).__name__, error)
        if failed:
            raise failed[0][1]
        return [f.result() for f in futures]

if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:  # a config, data or run-folder problem: one `error:` line
        fail(error)
