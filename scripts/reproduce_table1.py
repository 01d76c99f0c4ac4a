"""Reproduce LAMB's Table 1 (arXiv 1904.00962): `make reproduce-table1 SCALE=smoke|small|paper`.

Steps, each a plain `lb-*` command that is printed before it runs (so any step can be rerun by hand):
  1. base-lr sweep: each optimizer's base lr is chosen ONCE, by final eval loss at the base batch on a
     quarter of the sample budget (the paper's "untuned" protocol: no tuning at the other rungs);
  2. the batch ladder (LAMB and AdamW at every rung, LARS at base/middle/top) as Hydra multiruns,
     and the mixed-batch row (two stages, re-warmup);
  3. downstream: every pretrained checkpoint fine-tuned with one fixed recipe on a bundled
     classification task, beside the same recipe from a random init;
  4. lb-report: runs.csv, table.md, plots and provenance into the results folder.
Runs live under outputs/ (git-ignored); the results folder gets the report and each run's small
records (config, env, plan, metrics, summary). SCALE=smoke never writes into results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SCALES = {
    # seconds: the tests run this
    "smoke": dict(ladder=[8, 32], lars=[8], sweep=None, results="outputs/lamb_table1_smoke/results",
                  train=["scale=tiny", "epochs=0.5", "eval_every_epochs=0.25", "scaling.ref_batch=8",
                         "schedule.warmup_epochs=0.01", "progress=false"],
                  mixed=["stages.0.batch=64", "stages.1.batch=32", "stages.1.warmup_fraction=0.128"],
                  lrs={"lamb": 2e-3, "adamw": 3e-4, "lars_paper": 2e-3},
                  finetune=["--max-train", "256", "--max-eval", "128"]),
    # about an hour on 2 cores: the committed results
    "small": dict(ladder=[4, 16, 64, 256], lars=[4, 64, 256], sweep=(0.35, {
                      "lamb": [3e-4, 1e-3, 3e-3], "adamw": [3e-5, 1e-4, 3e-4], "lars_paper": [3e-4, 1e-3, 3e-3]}),
                  results="results/lamb_table1", train=["progress=false"],
                  mixed=["stages.1.warmup_fraction=0.128"], lrs=None, finetune=[]),
}
OPTIMIZERS = ("lamb", "adamw", "lars_paper")


def run(cmd: list[str], log: list) -> None:
    print("+ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    log.append({"command": " ".join(cmd), "seconds": round(time.perf_counter() - started, 1)})


def lb_train(overrides: list[str], sweep_dir: Path | None = None, run_dir: Path | None = None,
             experiment: str = "lamb_table1") -> list[str]:
    where = [f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else [f"hydra.run.dir={run_dir}"]
    return [str(BIN / "lb-train"), *(["-m"] if sweep_dir else []), f"experiment={experiment}", *overrides, *where]


def final_eval_loss(run_dir: Path) -> float:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["eval/loss"]


def sweep_base_lrs(scale: dict, out: Path, log: list) -> dict:
    fraction, grid = scale["sweep"]
    epochs = fraction * 1.4  # experiment=lamb_table1 trains 1.4 epochs
    chosen, record = {}, {}
    base = scale["ladder"][0]
    for opt, lrs in grid.items():
        sweep_dir = out / "lr_sweep" / opt
        run(lb_train([*scale["train"], f"optimizer={opt}", f"batch={base}", f"epochs={epochs}",
                      "save_checkpoint=false", f"optimizer.lr={','.join(map(str, lrs))}"], sweep_dir), log)
        losses = {}
        for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").exists()):
            lr = json.loads((run_dir / "plan.json").read_text())[0]["lr"]
            losses[lr] = final_eval_loss(run_dir)
        chosen[opt] = min(losses, key=losses.get)
        record[opt] = {"batch": base, "epochs": epochs, "eval_loss_by_lr": losses, "chosen_lr": chosen[opt]}
    return chosen, record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=[*SCALES, "paper"], default="small")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the top two rungs (LAMB and AdamW)")
    args = parser.parse_args(argv)
    if args.scale == "paper":
        sys.exit("SCALE=paper needs GPUs/TPUs and the paper's data; see experiments/lamb_table1/README.md "
                 "for the `accelerate launch` commands (and `lb-plan experiment=lamb_table1_paper ...`)")
    scale = SCALES[args.scale]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = REPO / "outputs" / "lamb_table1" / f"{args.scale}_{stamp}"
    runs = out / "runs"
    log: list = []
    started = time.perf_counter()

    if scale["sweep"]:
        lrs, sweep_record = sweep_base_lrs(scale, out, log)
    else:
        lrs, sweep_record = dict(scale["lrs"]), {"note": "fixed lrs (smoke scale: no sweep)"}
    print(f"base lrs: {lrs}", flush=True)

    ladder = ",".join(map(str, scale["ladder"]))
    for opt in ("lamb", "adamw"):
        run(lb_train([*scale["train"], f"optimizer={opt}", f"optimizer.lr={lrs[opt]}", f"batch={ladder}"],
                     runs / opt), log)
    run(lb_train([*scale["train"], "optimizer=lars_paper", f"optimizer.lr={lrs['lars_paper']}",
                  f"batch={','.join(map(str, scale['lars']))}"], runs / "lars_paper"), log)
    if args.seeds > 1:
        top = ",".join(map(str, scale["ladder"][-2:]))
        for opt in ("lamb", "adamw"):
            run(lb_train([*scale["train"], f"optimizer={opt}", f"optimizer.lr={lrs[opt]}", f"batch={top}",
                          f"seed={','.join(str(s) for s in range(1, args.seeds))}"], runs / f"{opt}_seeds"), log)
    run(lb_train([*scale["train"], f"optimizer.lr={lrs['lamb']}", *scale["mixed"]],
                 run_dir=runs / "lamb_mixed" / "0_mixed", experiment="lamb_mixed_batch"), log)

    run_dirs = sorted(str(p.parent) for p in runs.rglob("summary.json"))
    run([str(BIN / "lb-finetune"), *run_dirs, "--random-init", *scale["finetune"]], log)

    results = REPO / scale["results"]
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    for run_dir in map(Path, run_dirs):  # the small records of every run, beside the report
        dest = results / "runs" / run_dir.relative_to(runs)
        dest.mkdir(parents=True)
        for name in ("config.yaml", "env.json", "plan.json", "metrics.jsonl", "summary.json",
                     "downstream.json", "downstream_random.json"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, dest / name)
    (results / "lr_sweep.json").write_text(json.dumps(sweep_record, indent=2) + "\n")
    wall = time.perf_counter() - started
    (results / "reproduce.json").write_text(json.dumps({
        "command": "make reproduce-table1 SCALE=" + args.scale, "scale": args.scale, "seeds": args.seeds,
        "wall_time_s": round(wall, 1), "base_lrs": lrs, "steps": log, "run_folder": str(out.relative_to(REPO)),
    }, indent=2) + "\n")
    run([str(BIN / "lb-report"), str(results / "runs"), "--out", str(results),
         "--title", f"LAMB Table 1, reduced scale ({args.scale})", "--unigram-from-config", run_dirs[0]], log)
    print(f"done in {wall / 60:.1f} min: {results}", flush=True)


if __name__ == "__main__":
    main()
