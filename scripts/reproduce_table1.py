"""Reproduce LAMB's Table 1 (arXiv 1904.00962): `make reproduce-table1 SCALE=smoke|small|paper`.

  1. base-lr sweep: each optimizer's base lr is chosen ONCE, by final eval loss at the base batch on a
     quarter of the sample budget (the paper's "untuned" protocol: no tuning at the other rungs);
  2. the batch ladder (LAMB and AdamW at every rung, LARS at base/middle/top) and the mixed-batch row
     (two stages, re-warmup), all with the same samples in the same order;
  3. downstream: every pretrained checkpoint fine-tuned with one fixed recipe on a bundled
     classification task, and the same recipe once from a random init (the same for every rung);
  4. lb-report: runs.csv, table.md, plots and provenance into the results folder.
Everything runs in this one process (no per-run interpreter start-up); each run prints the `lb-train`
command that reproduces it alone. Runs live under outputs/ (git-ignored); the results folder gets the
report and each run's small records. SCALE=smoke never writes into results/.
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

from largebatch import downstream, report  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.train import train  # noqa: E402

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


class Runner:
    def __init__(self, out: Path):
        self.out, self.steps = out, []

    def train(self, overrides: list[str], run_dir: Path, experiment: str = "lamb_table1") -> dict:
        overrides = [f"experiment={experiment}", "progress=false", *overrides]
        log.info("+ lb-train %s hydra.run.dir=%s", " ".join(overrides), rel(run_dir))
        started = time.perf_counter()
        summary = train(compose(overrides), run_dir)
        self.steps.append({"command": "lb-train " + " ".join(overrides), "run_dir": rel(run_dir),
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


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=[*SCALES, "paper"], default="small")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the top two rungs (LAMB and AdamW)")
    parser.add_argument("--out", help="results folder (default: the scale's)")
    parser.add_argument("--work", help="folder for the runs themselves (default: outputs/lamb_table1/<scale>_<time>)")
    args = parser.parse_args(argv)
    if args.scale == "paper":
        sys.exit("SCALE=paper needs GPUs/TPUs and the paper's data: run the `accelerate launch` commands of "
                 "experiments/lamb_table1/README.md (and `lb-plan experiment=lamb_table1_paper ...` to see them)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    scale = SCALES[args.scale]
    out = Path(args.work) if args.work else REPO / "outputs" / "lamb_table1" / f"{args.scale}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    runs = out / "runs"
    runner = Runner(out)
    started = time.perf_counter()

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

    # 3. downstream
    run_dirs = sorted({p.parent for p in runs.rglob("summary.json")})
    t0 = time.perf_counter()
    downstream.main([str(run_dirs[0]), "--random-init", *scale["finetune"]])  # random init: once, same config
    downstream.main([*map(str, run_dirs[1:]), *scale["finetune"]])
    runner.steps.append({"command": "lb-finetune <every run> (+ --random-init on the first)",
                         "seconds": round(time.perf_counter() - t0, 1)})

    # 4. records and report
    results = Path(args.out) if args.out else REPO / scale["results"]
    if results.exists():
        shutil.rmtree(results)
    for run_dir in run_dirs:  # the small records of every run, beside the report
        dest = results / "runs" / run_dir.relative_to(runs)
        dest.mkdir(parents=True)
        for name in ("config.yaml", "env.json", "plan.json", "metrics.jsonl", "summary.json",
                     "downstream.json", "downstream_random.json"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, dest / name)
    (results / "lr_sweep.json").write_text(json.dumps(sweep_record, indent=2) + "\n")
    wall = time.perf_counter() - started
    (results / "reproduce.json").write_text(json.dumps({
        "command": f"make reproduce-table1 SCALE={args.scale} SEEDS={args.seeds}", "wall_time_s": round(wall, 1),
        "base_lrs": lrs, "run_folder": rel(out), "steps": runner.steps,
    }, indent=2) + "\n")
    report.main([str(results / "runs"), "--out", str(results), "--title",
                 f"LAMB Table 1 at reduced scale ({args.scale}): {wall / 60:.1f} minutes on this machine",
                 "--unigram-from-config", str(run_dirs[0])])
    log.info("done in %.1f min: %s", wall / 60, results)
    return results


if __name__ == "__main__":
    main()
