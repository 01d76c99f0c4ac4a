"""Reproduce LAMB's Table 1 (arXiv 1904.00962): `make reproduce-table1 SCALE=smoke|small|paper`.

  1. base-lr sweep: each optimizer's base lr is chosen ONCE, by final eval loss at the base batch on a
     quarter of the sample budget (the paper's "untuned" protocol: no tuning at the other rungs);
  2. the batch ladder (LAMB and AdamW at every rung, LARS at base/middle/top) and the mixed-batch row
     (two stages, re-warmup), all with the same samples in the same order;
  3. downstream: every pretrained checkpoint fine-tuned with one fixed recipe on a bundled
     classification task, and the same recipe once from a random init (the same for every rung);
  4. lb-report: runs.csv, table.md, plots and provenance into the results folder.
Everything runs in this one process (no per-run interpreter start-up); each run prints the `lb-train`
command that reproduces it alone. Runs live under outputs/lamb_table1/<scale>/ (git-ignored; --work for
another folder); the results folder gets the report and each run's small records. SCALE=smoke never
writes into results/.

Interrupted (Ctrl-C, a kill, a reboot) and run again with the same arguments, it picks up where it
stopped: a run whose folder's status.json says "finished" is skipped, an unfinished one is continued from
its newest checkpoint (`resume=auto`; every run checkpoints every CHECKPOINT_EVERY_EPOCHS epochs), and
fine-tunes already scored are kept. To start over, delete the work folder or pass another --work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from largebatch import downstream, report  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.errors import ConfigError, LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.report.runs import BOOKKEEPING_KEYS, flatten_config, key_matches, read_json  # noqa: E402
from largebatch.train import train  # noqa: E402

# What makes a run resumable, passed to the trainer (issue 12, item 1): periodic checkpoints on every run,
# and `resume=auto` for a run folder that holds an unfinished run (newest complete checkpoint, or a fresh
# start in that folder when it has none).
CHECKPOINT_EVERY_EPOCHS = 0.1
CHECKPOINT_OVERRIDES = [f"checkpoint_every_epochs={CHECKPOINT_EVERY_EPOCHS}"]
RESUME_OVERRIDES = ["resume=auto"]

SCALES = {
    "smoke": dict(  # seconds; a test runs it
        ladder=[8, 32], lars=[8], sweep=None, results="outputs/lamb_table1_smoke/results",
        train=["scale=tiny", "data.max_documents=200", "data.train_multiple_of=64", "epochs=0.25",
               "eval_every_epochs=0.125", "eval_max_batches=1", "scaling.ref_batch=8",
               "schedule.warmup_epochs=0.01"],
        mixed=["stages.0.batch=64", "stages.1.batch=32", "stages.1.warmup_fraction=0.25"],
        lrs={"lamb": 2e-3, "adamw": 3e-4, "lars_paper": 2e-3},
        finetune=["--max-train", "64", "--max-eval", "64", "--threads", "0"]),
    "small": dict(  # about an hour on 2 cores: the committed results
        ladder=[4, 16, 64, 128], lars=[4, 16, 128],
        sweep=(0.25, {"lamb": [3e-4, 1e-3, 3e-3], "adamw": [3e-5, 1e-4, 3e-4], "lars_paper": [3e-4, 1e-3, 3e-3]}),
        results="results/lamb_table1", train=[], mixed=["stages.1.warmup_fraction=0.128"], lrs=None,
        finetune=["--threads", "0"]),
}
log = logging.getLogger("reproduce_table1")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_action(run_dir: Path) -> str:
    """What to do with one run folder of the driver: "skip", "resume" or "start".

    skip: status.json says "finished" (the trainer writes it last) and summary.json is there, or, for a run
    of a trainer that wrote no status.json, summary.json is there (that trainer wrote it last).
    resume: the folder holds anything else (status running/failed/interrupted, or records without a
    status): the trainer continues it from its newest complete checkpoint, or starts it afresh there.
    start: no folder, or an empty one.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json")
    finished = (run_dir / "summary.json").is_file()
    if isinstance(status, dict):
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


class Runner:
    def __init__(self, out: Path):
        self.out, self.steps, self.run_dirs = out, [], []

    def train(self, overrides: list[str], run_dir: Path, experiment: str = "lamb_table1") -> dict:
        overrides = [f"experiment={experiment}", "progress=false", *overrides, *CHECKPOINT_OVERRIDES]
        action = run_action(run_dir)
        if action == "resume":
            overrides += RESUME_OVERRIDES
        cfg = compose(overrides)
        changes = config_changes(run_dir, cfg) if action != "start" else []
        if changes:
            raise ConfigError(
                f"{rel(run_dir)} holds a run made with another config ({'; '.join(changes[:3])}): pass another "
                f"--work folder, or delete {rel(run_dir)} to run it again"
            )
        self.run_dirs.append(run_dir)
        command = "lb-train " + " ".join(overrides)
        if action == "skip":
            log.info("= %s hydra.run.dir=%s: finished earlier, skipped", command, rel(run_dir))
            self.steps.append({"command": command, "run_dir": rel(run_dir), "action": action})
            return json.loads((run_dir / "summary.json").read_text())
        log.info("+ %s hydra.run.dir=%s%s", command, rel(run_dir), " (resuming)" if action == "resume" else "")
        started = time.perf_counter()
        summary = train(cfg, run_dir)
        self.steps.append({"command": command, "run_dir": rel(run_dir), "action": action,
                           "seconds": round(time.perf_counter() - started, 1)})
        return summary

    def sweep(self, overrides: list[str], grid: dict[str, list], folder: Path, **kw) -> list[Path]:
        """Hydra-multirun-like: one run per combination of the grid's values, in folder/<n>_<k=v,...>."""
        dirs = []
        for n, values in enumerate(itertools.product(*grid.values())):
            combo = [f"{k}={v}" for k, v in zip(grid, values)]
            dirs.append(folder / f"{n}_{','.join(combo)}")
            self.train([*overrides, *combo], dirs[-1], **kw)
        return dirs


def sweep_base_lrs(runner: Runner, scale: dict) -> tuple[dict, dict]:
    fraction, grid = scale["sweep"]
    epochs = round(fraction * compose(["experiment=lamb_table1"]).epochs, 6)
    base = scale["ladder"][0]
    chosen, record = {}, {}
    for opt, lrs in grid.items():
        dirs = runner.sweep([*scale["train"], f"optimizer={opt}", f"batch={base}", f"epochs={epochs}",
                             "save_checkpoint=false"], {"optimizer.lr": lrs}, runner.out / "lr_sweep" / opt)
        losses = {lr: json.loads((d / "summary.json").read_text())["eval/loss"] for lr, d in zip(lrs, dirs)}
        chosen[opt] = min(losses, key=losses.get)
        record[opt] = {"batch": base, "epochs": epochs, "eval_loss_by_lr": losses, "chosen_lr": chosen[opt]}
        log.info("base lr of %s: %g (eval loss by lr: %s)", opt, chosen[opt], losses)
    return chosen, record


class Clock:
    """Wall time of this driver over every call on one work folder (an interrupted call included)."""

    def __init__(self, path: Path):
        self.path, self.started = path, time.perf_counter()
        earlier = read_json(path) or {}
        self.earlier_s, self.calls = float(earlier.get("seconds", 0.0)), int(earlier.get("calls", 0)) + 1

    def total_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def save(self) -> None:
        atomic_write_json(self.path, {"seconds": round(self.total_s(), 1), "calls": self.calls})


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=[*SCALES, "paper"], default="small")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the top two rungs (LAMB and AdamW)")
    parser.add_argument("--out", help="results folder (default: the scale's)")
    parser.add_argument("--work", help="folder for the runs themselves (default: outputs/lamb_table1/<scale>); "
                        "a second call with the same folder skips finished runs and resumes unfinished ones")
    args = parser.parse_args(argv)
    if args.scale == "paper":
        sys.exit("SCALE=paper needs GPUs/TPUs and the paper's data: run the `accelerate launch` commands of "
                 "experiments/lamb_table1/README.md (and `lb-plan experiment=lamb_table1_paper ...` to see them)")
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
    runner = Runner(out)

    # 1. base learning rates
    if scale["sweep"]:
        lrs, sweep_record = sweep_base_lrs(runner, scale)
    else:
        lrs, sweep_record = dict(scale["lrs"]), {"note": f"fixed lrs at scale {args.scale} (no sweep)"}

    # 2. the ladder and the mixed batch
    seeds = list(range(args.seeds))
    for opt in ("lamb", "adamw"):
        runner.sweep([*scale["train"], f"optimizer={opt}", f"optimizer.lr={lrs[opt]}"],
                     {"batch": scale["ladder"][:-2]}, runs / opt)
        runner.sweep([*scale["train"], f"optimizer={opt}", f"optimizer.lr={lrs[opt]}"],
                     {"batch": scale["ladder"][-2:], "seed": seeds}, runs / f"{opt}_top")
    runner.sweep([*scale["train"], "optimizer=lars_paper", f"optimizer.lr={lrs['lars_paper']}"],
                 {"batch": scale["lars"]}, runs / "lars_paper")
    runner.train([*scale["train"], f"optimizer.lr={lrs['lamb']}", *scale["mixed"]], runs / "lamb_mixed" / "0",
                 experiment="lamb_mixed_batch")

    # 3. downstream (runs scored by an earlier, interrupted call keep their scores)
    run_dirs = sorted(d for d in runner.run_dirs if d.is_relative_to(runs))
    t0 = time.perf_counter()
    first, rest = run_dirs[0], run_dirs[1:]
    score_first = read_json(first / "downstream.json") is None or read_json(first / "downstream_random.json") is None
    if score_first:
        downstream.main([str(first), "--random-init", *scale["finetune"]])  # random init: once, same config
    todo = [d for d in rest if read_json(d / "downstream.json") is None]
    if todo:
        downstream.main([*map(str, todo), *scale["finetune"]])
    runner.steps.append({"command": "lb-finetune <every run> (+ --random-init on the first)",
                         "runs_scored": len(todo) + score_first, "seconds": round(time.perf_counter() - t0, 1)})

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
        "command": f"make reproduce-table1 SCALE={args.scale} SEEDS={args.seeds}", "wall_time_s": round(wall, 1),
        "calls": clock.calls, "base_lrs": lrs, "run_folder": rel(out), "steps": runner.steps,
        "skipped_runs": sum(step.get("action") == "skip" for step in runner.steps),
        "resumed_runs": sum(step.get("action") == "resume" for step in runner.steps),
    })
    report.main([str(results / "runs"), "--out", str(results), "--title",
                 f"LAMB Table 1 at reduced scale ({args.scale}): {wall / 60:.1f} minutes on this machine"
                 + (f" over {clock.calls} calls of the driver (it resumes)" if clock.calls > 1 else ""),
                 "--unigram-from-config", str(run_dirs[0])])
    log.info("done in %.1f min: %s", wall / 60, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:  # a config, data or run-folder problem: one `error:` line
        fail(error)
