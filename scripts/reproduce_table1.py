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
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from largebatch import downstream, report  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.errors import ConfigError, LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.pool import train_in_worker  # noqa: E402
from largebatch.report.runs import BOOKKEEPING_KEYS, flatten_config, key_matches, read_json  # noqa: E402
from largebatch.train import train  # noqa: E402

# What makes a run resumable, passed to the trainer (issue 12, item 1): periodic checkpoints on every run,
# and `resume=auto` for a run folder that holds an unfinished run (newest complete checkpoint, or a fresh
# start in that folder when it has none).
CHECKPOINT_EVERY_EPOCHS = 0.1
CHECKPOINT_OVERRIDES = [f"checkpoint_every_epochs={CHECKPOINT_EVERY_EPOCHS}"]
RESUME_OVERRIDES = ["resume=auto"]

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
        train=["epochs=0.16666666667", "eval_every_epochs=0.0104166667", "schedule.warmup_epochs=0.00052083333"],
        mixed=[*MIXED_SEQ, "stages.1.warmup_fraction=0.128"], lrs="results/lamb_table1/lr_sweep.json",
        finetune=["--threads", "1", "--max-train", "2000"]),
    "small": dict(  # the committed results: 7 rungs x 2 optimizers x 2 seeds, LARS, mixed; ~1.5 h on 2 cores
        ladder=SMALL_LADDER, seeds=2, lars=[2, 16, 128], results="results/lamb_table1", train=[],
        sweep=dict(fraction=0.25, max_widen=4,
                   grid={"lamb": [1e-3, 3e-3, 1e-2], "adamw": [1e-4, 3e-4, 1e-3], "lars_paper": [1e-3, 3e-3, 1e-2]}),
        mixed=[*MIXED_SEQ, "stages.1.warmup_fraction=0.128"], lrs=None, finetune=["--threads", "1"]),
    "gpu": dict(  # one CUDA device, planned for under 10 minutes (never run yet: experiments/lamb_table1/README.md)
        ladder=[32, 64, 128, 256, 512, 1024, 2048], seeds=1, lars=[32, 256, 2048], results="results/lamb_table1_gpu",
        jobs=1, checkpoint_every=1.0,
        train=["model.size=mini", "data.seq_len=128", "data.train_multiple_of=2048", "scaling.ref_batch=32",
               "epochs=8", "schedule.warmup_epochs=0.025", "eval_every_epochs=0.5", "micro_batch=2048",
               "eval_batch=256", "eval_max_batches=4"],
        sweep=dict(fraction=0.25, max_widen=2,
                   grid={"lamb": [3e-3, 1e-2, 3e-2], "adamw": [3e-4, 1e-3, 3e-3], "lars_paper": [3e-3, 1e-2, 3e-2]}),
        mixed=["stages.0.batch=4096", "stages.1.batch=2048", "stages.0.seq_len=64", "stages.1.seq_len=128",
               "stages.1.warmup_fraction=0.128"], lrs=None, finetune=["--threads", "0"]),
}
log = logging.getLogger("reproduce_table1")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_action(run_dir: Path) -> str:
    """What to do with one run folder of the driver: "skip", "diverged", "resume" or "start".

    skip: status.json says "finished" (the trainer writes it last) and summary.json is there, or, for a run
    of a trainer that wrote no status.json, summary.json is there (that trainer wrote it last).
    diverged: status.json says "failed" on a non-finite loss; the same run would diverge again.
    resume: the folder holds anything else (status running/failed/interrupted, or records without a
    status): the trainer continues it from its newest complete checkpoint, or starts it afresh there.
    start: no folder, or an empty one.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json")
    finished = (run_dir / "summary.json").is_file()
    if isinstance(status, dict):
        if status.get("status") == "failed" and str(status.get("error", "")).startswith("NonFiniteError"):
            return "diverged"
        return "skip" if status.get("status") == "finished" and finished else "resume"
    if finished and not (run_dir / "status.json").exists():
        return "skip"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "resume"
    return "start"


def config_changes(run_dir: Path, cfg) -> list[str]:
    """How the config saved in ``run_dir`` differs from ``cfg`` (bookkeeping keys such as resume aside)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return []
    saved = flatten_config(OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "config.yaml"), resolve=True))
    wanted = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    return [f"{k}: {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in sorted(saved.keys() | wanted.keys())
            if not key_matches(k, BOOKKEEPING_KEYS) and saved.get(k) != wanted.get(k)]


@dataclass
class Job:
    overrides: list[str]
    run_dir: Path
    experiment: str = "lamb_table1"
    command: str = ""
    action: str = ""
    cfg: object = field(default=None, repr=False)
    steps: int = 0  # planned optimizer steps: the pool starts the longest runs first


class Runner:
    """Runs jobs: in this process (``jobs=1``) or in a pool of ``jobs`` spawned processes with
    ``threads`` torch threads each. Every run is skipped, resumed or started per :func:`run_action`."""

    def __init__(self, out: Path, jobs: int = 1, threads: int | None = None,
                 checkpoint_every: float = CHECKPOINT_EVERY_EPOCHS):
        self.out, self.jobs, self.steps, self.run_dirs = out, jobs, [], []
        self.checkpoint = [f"checkpoint_every_epochs={checkpoint_every}"]
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)

    def prepare(self, job: Job) -> Job:
        job.overrides = [f"experiment={job.experiment}", "progress=false", *job.overrides, *self.checkpoint]
        job.action = run_action(job.run_dir)
        if job.action == "resume":
            job.overrides += RESUME_OVERRIDES
        job.cfg = compose(job.overrides)
        changes = config_changes(job.run_dir, job.cfg) if job.action != "start" else []
        if changes:
            raise ConfigError(
                f"{rel(job.run_dir)} holds a run made with another config ({'; '.join(changes[:3])}): pass another "
                f"--work folder, or delete {rel(job.run_dir)} to run it again"
            )
        job.command = "lb-train " + " ".join(job.overrides)
        samples = job.cfg.epochs * (job.cfg.data.get("train_samples") or 1)
        job.steps = int(samples / job.cfg.batch) if not job.cfg.stages else 0
        self.run_dirs.append(job.run_dir)
        return job

    def _record(self, job: Job, seconds: float | None = None, error: str | None = None) -> None:
        step = {"command": job.command, "run_dir": rel(job.run_dir), "action": job.action}
        if seconds is not None:
            step["seconds"] = round(seconds, 1)
        if error:
            step["error"] = error
        self.steps.append(step)

    def train(self, overrides: list[str], run_dir: Path, experiment: str = "lamb_table1") -> dict | None:
        """One run in this process (the summary; None for a run that diverged)."""
        return self.run_many([Job(overrides, run_dir, experiment)], in_process=True)[0]

    def run_many(self, jobs: list[Job], in_process: bool = False) -> list[dict | None]:
        """Every job's summary (None where the run diverged or failed), in the order given."""
        jobs = [self.prepare(job) for job in jobs]
        results: list[dict | None] = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            if job.action in ("skip", "diverged"):
                log.info("= %s hydra.run.dir=%s: %s earlier, skipped", job.command, rel(job.run_dir),
                         "finished" if job.action == "skip" else "diverged")
                self._record(job)
                if job.action == "skip":
                    results[i] = json.loads((job.run_dir / "summary.json").read_text())
            else:
                todo.append(i)
        if in_process or self.jobs == 1:
            for i in todo:
                results[i] = self._run_here(jobs[i])
            return results
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            started = {}
            for i in sorted(todo, key=lambda i: -jobs[i].steps):  # longest first: the pool ends together
                log.info("+ %s hydra.run.dir=%s%s", jobs[i].command, rel(jobs[i].run_dir),
                         " (resuming)" if jobs[i].action == "resume" else "")
                started[i] = (pool.submit(train_in_worker, jobs[i].overrides, str(jobs[i].run_dir), self.threads),
                              time.perf_counter())
            for i, (future, t0) in started.items():
                outcome = future.result()
                self._record(jobs[i], time.perf_counter() - t0, outcome.get("error"))
                if "error" in outcome:
                    log.warning("run %s failed: %s", rel(jobs[i].run_dir), outcome["error"][:300])
                results[i] = outcome.get("summary")
        return results

    def _run_here(self, job: Job) -> dict | None:
        log.info("+ %s hydra.run.dir=%s%s", job.command, rel(job.run_dir),
                 " (resuming)" if job.action == "resume" else "")
        started = time.perf_counter()
        try:
            summary = train(job.cfg, job.run_dir)
        except LargebatchError as error:
            if run_action(job.run_dir) != "diverged":
                raise
            self._record(job, time.perf_counter() - started, f"{type(error).__name__}: {error}")
            log.warning("run %s diverged: %s", rel(job.run_dir), error)
            return None
        self._record(job, time.perf_counter() - started)
        return summary


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the half-decade grid 1, 3, 10, 30, ... (x 10^k)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** exponent
    if up:
        return float(f"{(3 if mantissa < 2 else 10) * 10 ** exponent:.0e}")
    return float(f"{(1 if mantissa > 2 else 0.3) * 10 ** exponent:.0e}")


def sweep_base_lrs(runner: Runner, scale: dict) -> tuple[dict, dict]:
    """The base lr of every optimizer: its grid at the base batch, widened past an edge that holds the best
    final eval loss (a diverged run counts as infinitely bad), up to ``max_widen`` times."""
    sweep = scale["sweep"]
    epochs = round(sweep["fraction"] * compose(["experiment=lamb_table1"]).epochs, 9)
    base = scale["ladder"][0]
    grid = {opt: sorted(lrs) for opt, lrs in sweep["grid"].items()}
    losses: dict[str, dict[float, float]] = {opt: {} for opt in grid}
    for round_ in range(sweep["max_widen"] + 1):
        todo = [(opt, lr) for opt, lrs in grid.items() for lr in lrs if lr not in losses[opt]]
        jobs = [Job([*scale["train"], f"optimizer={opt}", f"batch={base}", f"epochs={epochs}", "save_checkpoint=false",
                     f"optimizer.lr={lr}"], runner.out / "lr_sweep" / opt / f"optimizer.lr={lr:g}") for opt, lr in todo]
        for (opt, lr), summary in zip(todo, runner.run_many(jobs)):
            loss = (summary or {}).get("eval/loss")
            losses[opt][lr] = loss if loss is not None and math.isfinite(loss) else math.inf
        widened = False
        for opt, lrs in grid.items():
            best = min(lrs, key=lambda lr: losses[opt][lr])
            if best in (lrs[0], lrs[-1]) and round_ < sweep["max_widen"]:
                lrs.append(next_lr(best, up=best == lrs[-1]))
                lrs.sort()
                widened = True
        if not widened:
            break
    chosen, record = {}, {}
    for opt, lrs in grid.items():
        chosen[opt] = min(lrs, key=lambda lr: losses[opt][lr])
        interior = chosen[opt] not in (lrs[0], lrs[-1])
        record[opt] = {"batch": base, "epochs": epochs, "eval_loss_by_lr": {f"{lr:g}": losses[opt][lr] for lr in lrs},
                       "chosen_lr": chosen[opt], "interior": interior, "initial_grid": sweep["grid"][opt]}
        log.info("base lr of %s: %g (%s; eval loss by lr: %s)", opt, chosen[opt],
                 "interior" if interior else "STILL AT AN EDGE", record[opt]["eval_loss_by_lr"])
    return chosen, record


def committed_lrs(path: str) -> tuple[dict, dict]:
    """The base lrs chosen by the committed sweep (SCALE=quick does not sweep)."""
    sweep = read_json(REPO / path)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path} is missing: run `make reproduce-table1` (SCALE=small) once, or pass --lrs")
    lrs = {opt: entry["chosen_lr"] for opt, entry in sweep.items() if isinstance(entry, dict) and "chosen_lr" in entry}
    return lrs, {"note": f"base lrs from the committed sweep {path} (no sweep at this scale)", "lrs": lrs}


class Clock:
    """Wall time of this driver over every call on one work folder (an interrupted call included)."""

    def __init__(self, path: Path):
        self.path, self.started = path, time.perf_counter()
        earlier = read_json(path) or {}
        self.earlier_s, self.calls = float(earlier.get("seconds", 0.0)), int(earlier.get("calls", 0)) + 1

    def total_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"seconds": round(self.total_s(), 1), "calls": self.calls})


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
        calls.append([str(first), "--random-init", *scale["finetune"]])  # random init: once, same config
    todo = [d for d in scored if read_json(d / "downstream.json") is None]
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
                         "runs_scored": len(todo) + (len(calls) > len(parts)), "seconds": round(time.perf_counter() - t0, 1)})

    # 4. records and report
    results = Path(args.out) if args.out else REPO / scale["results"]
    if results.exists():
        shutil.rmtree(results)
    for run_dir in run_dirs:  # the small records of every run, beside the report
        dest = results / "runs" / run_dir.relative_to(runs)
        dest.mkdir(parents=True)
        for name in ("status.json", "config.yaml", "env.json", "plan.json", "metrics.jsonl", "summary.json",
                     "downstream.json", "downstream_random.json"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, dest / name)
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
    report.main([str(results / "runs"), "--out", str(results), "--title",
                 f"LAMB Table 1 at reduced scale ({args.scale}): {wall / 60:.1f} minutes on this machine"
                 + (f" over {clock.calls} calls of the driver (it resumes)" if clock.calls > 1 else ""),
                 "--unigram-from-config", str(first)])
    log.info("done in %.1f min: %s", wall / 60, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:  # a config, data or run-folder problem: one `error:` line
        fail(error)
