"""Reproduce LAMB's Table 1 (arXiv 1904.00962): `make reproduce-table1 SCALE=smoke|quick|small|gpu`.

  1. base-lr sweep: each optimizer's base lr is chosen ONCE, by final eval loss at the base batch on a
     quarter of the sample budget; a grid whose best value sits at an edge is widened past that edge
     (half-decade steps) until the best is interior (the paper's "untuned" protocol: no tuning at the
     other rungs). SCALE=quick reuses the committed sweep's choice instead of sweeping.
  2. the batch ladder (LAMB and AdamW at every rung with every seed, LARS at base/middle/top) and the
     mixed-batch row (two stages, re-warmup), all with the same samples in the same order;
  3. downstream: every pretrained checkpoint fine-tuned with one fixed recipe on a bundled
     classification task, and the same recipe once from a random init (the same for every rung);
  4. lb-report: runs.csv, table.md (steps to target, noise bands, the measured gradient noise scale),
     plots and provenance into the results folder.
Runs go to a pool of ``--jobs`` worker processes (default: one per core, one torch thread each: on this
2-core machine 1.35x the throughput of one run at a time with two threads, experiments/lamb_table1/
README.md), longest first; each run prints the `lb-train` command that reproduces it alone. Runs live
under outputs/lamb_table1/<scale>/ (git-ignored; --work for another folder); the results folder gets the
report and each run's small records. SCALE=smoke never writes into results/.

Interrupted (Ctrl-C, a kill, a reboot) and run again with the same arguments, it picks up where it
stopped: a run whose folder's status.json says "finished" is skipped, one that stopped on a non-finite
loss is kept as diverged (it would diverge again), any other is continued from its newest checkpoint
(`resume=auto`; every run checkpoints every CHECKPOINT_EVERY_EPOCHS epochs), and fine-tunes already
scored are kept. To start over, delete the work folder or pass another --work.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The generic machinery lives in largebatch/drivers.py (shared with scripts/reproduce_legw.py); its names stay
# importable from here.
from largebatch import downstream, drivers, report  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.drivers import (  # noqa: E402, F401
    CHECKPOINT_EVERY_EPOCHS,
    CHECKPOINT_OVERRIDES,
    RESUME_OVERRIDES,
    Clock,
    Job,
    config_changes,
    finite_or_inf,
    next_lr,
    rel,
    run_action,
    train,
    widening_sweep,
)
from largebatch.errors import ConfigError, LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.report.runs import read_json  # noqa: E402

# The ladder's budget at seq 32 (experiment=lamb_table1): 1/3 epoch = 38,912 samples at every rung.
SMALL_LADDER = [2, 4, 8, 16, 32, 64, 128]
MIXED_SEQ = ["stages.0.seq_len=16", "stages.1.seq_len=32"]  # the ladder's length for the last stage, half before
SCALES = {
    "smoke": dict(  # seconds; a test runs it
        ladder=[8, 32], seeds=1, lars=[8], sweep=None, results="outputs/lamb_table1_smoke/results", jobs=1,
        train=["scale=tiny", "data.max_documents=200", "data.train_multiple_of=64", "data.seq_len=64", "epochs=0.25",
               "eval_every_epochs=0.125", "eval_max_batches=1", "scaling.ref_batch=8",
               "schedule.warmup_epochs=0.01"],
        mixed=["stages.0.batch=64", "stages.1.batch=32", "stages.0.seq_len=32", "stages.1.seq_len=64",
               "stages.1.warmup_fraction=0.25"],
        lrs={"lamb": 2e-3, "adamw": 3e-4, "lars_paper": 2e-3},
        finetune=["--max-train", "64", "--max-eval", "64", "--threads", "0"]),
    "quick": dict(  # ~20 minutes: the same pipeline on 4 rungs, one seed, half the samples, the committed lrs
        ladder=[2, 8, 32, 128], seeds=1, lars=[2, 128], sweep=None, results="outputs/lamb_table1_quick/results",
        # 19,456 samples a rung (152 steps at 128), eval every 1,024 samples (19 points, the same at every rung)
        train=["epochs=0.16666666667", "eval_every_epochs=0.0087719298", "schedule.warmup_epochs=0.00052083333"],
        mixed=[*MIXED_SEQ, "stages.1.warmup_fraction=0.128"], lrs="results/lamb_table1/lr_sweep.json",
        finetune=["--threads", "1"]),  # the whole tweets task: at 2,000 examples every model learns the majority class
    "small": dict(  # the committed results: 7 rungs x 2 optimizers x 2 seeds, LARS, mixed; ~1.5 h on 2 cores
        ladder=SMALL_LADDER, seeds=2, lars=[2, 16, 128], results="results/lamb_table1", train=[],
        sweep=dict(fraction=0.25, max_widen=4,
                   grid={"lamb": [1e-3, 3e-3, 1e-2], "adamw": [1e-4, 3e-4, 1e-3], "lars_paper": [1e-3, 3e-3, 1e-2]}),
        mixed=[*MIXED_SEQ, "stages.1.warmup_fraction=0.128"], lrs=None, finetune=["--threads", "1"]),
    "gpu": dict(  # one CUDA device, planned for under 10 minutes (never run yet: experiments/lamb_table1/README.md)
        ladder=[32, 64, 128, 256, 512, 1024, 2048], seeds=1, lars=[32, 256, 2048], results="results/lamb_table1_gpu",
        jobs=1, checkpoint_every=1.0,
        train=["model.size=mini", "data.seq_len=128", "data.train_multiple_of=2048", "scaling.ref_batch=32",
               "epochs=8", "schedule.warmup_epochs=0.025", "eval_every_epochs=0.6153846154", "micro_batch=2048",
               "eval_batch=256", "eval_max_batches=4"],
        sweep=dict(fraction=0.25, max_widen=2,
                   grid={"lamb": [3e-3, 1e-2, 3e-2], "adamw": [3e-4, 1e-3, 3e-3], "lars_paper": [3e-3, 1e-2, 3e-2]}),
        mixed=["stages.0.batch=4096", "stages.1.batch=2048", "stages.0.seq_len=64", "stages.1.seq_len=128",
               "stages.1.warmup_fraction=0.128"], lrs=None, finetune=["--threads", "0"]),
}
log = logging.getLogger("reproduce_table1")


class Runner(drivers.Runner):
    """:class:`largebatch.drivers.Runner` whose jobs run ``experiment=lamb_table1`` unless they name another."""

    default_experiment = "lamb_table1"


def sweep_base_lrs(runner: Runner, scale: dict) -> tuple[dict, dict]:
    """The base lr of every optimizer: its grid at the base batch, widened past an edge that holds the best
    final eval loss (a diverged run counts as infinitely bad), up to ``max_widen`` times
    (:func:`largebatch.drivers.widening_sweep`)."""
    sweep = scale["sweep"]
    epochs = round(sweep["fraction"] * compose(["experiment=lamb_table1"]).epochs, 9)
    base = scale["ladder"][0]

    def run(todo: list[tuple[str, float]]) -> list[float]:
        jobs = [Job([*scale["train"], f"optimizer={opt}", f"batch={base}", f"epochs={epochs}", "save_checkpoint=false",
                     f"optimizer.lr={lr}"], runner.out / "lr_sweep" / opt / f"optimizer.lr={lr:g}") for opt, lr in todo]
        return [finite_or_inf((summary or {}).get("eval/loss")) for summary in runner.run_many(jobs)]

    swept = widening_sweep(sweep["grid"], run, max_widen=sweep["max_widen"])
    chosen, record = {}, {}
    for opt, result in swept.items():
        chosen[opt] = result["chosen"]
        record[opt] = {"batch": base, "epochs": epochs,
                       "eval_loss_by_lr": {f"{lr:g}": loss for lr, loss in result["scores"].items()},
                       "chosen_lr": chosen[opt], "interior": result["interior"], "initial_grid": sweep["grid"][opt]}
        log.info("base lr of %s: %g (%s; eval loss by lr: %s)", opt, chosen[opt],
                 "interior" if result["interior"] else "STILL AT AN EDGE", record[opt]["eval_loss_by_lr"])
    return chosen, record


def committed_lrs(path: str) -> tuple[dict, dict]:
    """The base lrs chosen by the committed sweep (SCALE=quick does not sweep)."""
    sweep = read_json(REPO / path)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path} is missing: run `make reproduce-table1` (SCALE=small) once, or pass --lrs")
    lrs = {opt: entry["chosen_lr"] for opt, entry in sweep.items() if isinstance(entry, dict) and "chosen_lr" in entry}
    return lrs, {"note": f"base lrs from the committed sweep {path} (no sweep at this scale)", "lrs": lrs}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=[*SCALES, "paper"], default="small")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of every LAMB and AdamW rung "
                        "(default: the scale's: 2 at small, 1 at quick and smoke)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time, one process and cores/jobs "
                        "torch threads each (default: the scale's, else one per core)")
    parser.add_argument("--out", help="results folder (default: the scale's)")
    parser.add_argument("--work", help="folder for the runs themselves (default: outputs/lamb_table1/<scale>); "
                        "a second call with the same folder skips finished runs and resumes unfinished ones")
    args = parser.parse_args(argv)
    if args.scale == "paper":
        sys.exit("SCALE=paper needs GPUs/TPUs and the paper's data: run the `accelerate launch` commands of "
                 "experiments/lamb_table1/README.md (and `lb-plan experiment=lamb_table1_paper ...` to see them)")
    if args.scale == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("SCALE=gpu trains on one CUDA device and this machine has none; its plan: `lb-plan "
                     "experiment=lamb_table1 " + " ".join(SCALES["gpu"]["train"]) + " batch=32,2048`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    scale = SCALES[args.scale]
    out = Path(args.work) if args.work else REPO / "outputs" / "lamb_table1" / args.scale
    if out.exists():
        log.info("work folder %s exists: finished runs are skipped, unfinished ones resumed (delete it, or pass "
                 "another --work, to start over)", rel(out))
    clock = Clock(out / "driver_time.json")
    try:
        return _reproduce(args, scale, out, clock)
    finally:
        clock.save()  # also when interrupted: the next call's timing adds this one's


def _reproduce(args, scale: dict, out: Path, clock: Clock) -> Path:
    runs = out / "runs"
    jobs = args.jobs or scale.get("jobs") or os.cpu_count() or 1
    runner = Runner(out, jobs=jobs, checkpoint_every=scale.get("checkpoint_every", CHECKPOINT_EVERY_EPOCHS))
    seeds = list(range(args.seeds if args.seeds is not None else scale["seeds"]))
    log.info("%s: %d job(s) at a time, %d torch thread(s) each; seeds %s", args.scale, jobs, runner.threads, seeds)

    with runner, runner.stop_on_signals():  # a signal checkpoints the runs and stops; the pool closes
        # 1. base learning rates
        if scale["sweep"]:
            lrs, sweep_record = sweep_base_lrs(runner, scale)
        elif isinstance(scale["lrs"], str):
            lrs, sweep_record = committed_lrs(scale["lrs"])
        else:
            lrs, sweep_record = dict(scale["lrs"]), {"note": f"fixed lrs at scale {args.scale} (no sweep)"}

        # 2. the ladder, LARS and the mixed batch: one pool
        ladder = []
        for opt in ("lamb", "adamw"):
            ladder += [Job([*scale["train"], f"optimizer={opt}", f"optimizer.lr={lrs[opt]}", f"batch={b}", f"seed={s}"],
                           runs / opt / f"batch={b},seed={s}") for b in scale["ladder"] for s in seeds]
        ladder += [Job([*scale["train"], "optimizer=lars_paper", f"optimizer.lr={lrs['lars_paper']}", f"batch={b}",
                        "seed=0"], runs / "lars_paper" / f"batch={b},seed=0") for b in scale["lars"]]
        ladder.append(Job([*scale["train"], f"optimizer.lr={lrs['lamb']}", *scale["mixed"], "seed=0"],
                          runs / "lamb_mixed" / "seed=0", experiment="lamb_mixed_batch"))
        runner.run_many(ladder)

    # 3. downstream (runs scored by an earlier, interrupted call keep their scores); diverged runs have no model
    run_dirs = [job.run_dir for job in ladder]
    scored = [d for d in run_dirs if (d / "model").is_dir()]
    t0 = time.perf_counter()
    first = scored[0]
    calls = []
    if read_json(first / "downstream_random.json") is None:
        calls.append([str(first), "--random-init", *scale["finetune"]])  # both ways, once: the same config
    both_ways = bool(calls)
    todo = [d for d in scored if read_json(d / "downstream.json") is None and not (both_ways and d == first)]
    parts = [todo[i::jobs] for i in range(jobs)]
    calls += [[*map(str, part), *scale["finetune"]] for part in parts if part]
    if jobs == 1 or len(calls) == 1:
        for call in calls:
            downstream.main(call)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(downstream.main, call) for call in calls]:
                future.result()
    runner.steps.append({"command": "lb-finetune <every run> (+ --random-init on the first)",
                         "runs_scored": len(todo) + both_ways, "seconds": round(time.perf_counter() - t0, 1)})

    # 4. records and report
    results = Path(args.out) if args.out else REPO / scale["results"]
    if results.exists():
        shutil.rmtree(results)
    # the small records of every run, beside the report
    drivers.copy_run_records({d: d.relative_to(runs) for d in run_dirs}, results / "runs", (
        "status.json", "config.yaml", "env.json", "plan.json", "metrics.jsonl", "summary.json", "downstream.json",
        "downstream_random.json"))
    atomic_write_json(results / "lr_sweep.json", sweep_record)
    wall = clock.total_s()
    atomic_write_json(results / "reproduce.json", {
        "command": f"make reproduce-table1 SCALE={args.scale}" + (f" SEEDS={args.seeds}" if args.seeds else ""),
        "wall_time_s": round(wall, 1), "calls": clock.calls, "jobs": jobs, "threads_per_job": runner.threads,
        "base_lrs": lrs, "run_folder": rel(out), "steps": runner.steps,
        "skipped_runs": sum(step.get("action") == "skip" for step in runner.steps),
        "resumed_runs": sum(step.get("action") == "resume" for step in runner.steps),
        "diverged_runs": sum(run_action(d) == "diverged" for d in run_dirs),
    })
    # paths relative to where the driver runs (the repository, under make): the recorded command stays portable
    report.main([os.path.relpath(results / "runs"), "--out", os.path.relpath(results), "--title",
                 f"LAMB Table 1 at reduced scale ({args.scale}): {wall / 60:.1f} minutes on this machine"
                 + (f" over {clock.calls} calls of the driver (it resumes)" if clock.calls > 1 else ""),
                 "--unigram-from-config", os.path.relpath(first)])
    log.info("done in %.1f min: %s", wall / 60, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:  # a config, data or run-folder problem: one `error:` line
        fail(error)
