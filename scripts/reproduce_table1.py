"""Reproduce LAMB's Table 1 (arXiv 1904.00962): `make reproduce-table1 SCALE=smoke|quick|small|gpu`.

Every scale follows the protocol of docs/protocol.md (largebatch/protocol.py):

  1. base-lr sweep: each optimizer's base lr is chosen ONCE, by final VALIDATION loss at the base batch on
     a quarter of the sample budget (seed 0); a grid whose best value sits at an edge is widened past that
     edge (half-decade steps) until the best is interior (the paper's "untuned" protocol). SCALE=quick
     reuses the committed sweep's choice instead of sweeping.
  2. the batch ladder: each optimizer's base rung on ``target_seeds`` fresh seeds (its target), every other
     rung on ``seeds`` seeds (LAMB and AdamW at every rung, LARS at its rungs), and the mixed-batch row (two
     stages, re-warmup), all with the same samples in the same order;
  3. the tuned oracle (LAMB and AdamW) at the ``tuned`` rungs: a declared search around the sqrt rule's lr
     (:func:`largebatch.protocol.tuning_trials`), selected on validation, the best re-run on the seeds;
  4. downstream (where the scale fine-tunes): every pretrained checkpoint fine-tuned with one fixed recipe on
     a bundled classification task, and the same recipe once from a random init; out of the headline, as
     the probe sits at the majority class at this scale;
  5. lb-report: runs.csv, table.md (the protocol's verdicts on the test loss, steps to result, the
     McCandlish fit, B_simple by quarter), plots and provenance into the results folder.
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
from largebatch import protocol as P  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.drivers import (  # noqa: E402, F401
    CHECKPOINT_EVERY_EPOCHS,
    CHECKPOINT_OVERRIDES,
    RESUME_OVERRIDES,
    Clock,
    Job,
    config_changes,
    finite_or_inf,
    load_ladders,
    next_lr,
    rel,
    train,
    widening_sweep,
)
from largebatch.errors import ConfigError, LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.report import ladder as L  # noqa: E402
from largebatch.runfolder import (  # noqa: E402
    DOWNSTREAM,
    DOWNSTREAM_RANDOM,
    RECORDS,
    copy_records,
    read_json,
    read_metrics,
    run_action,
)

# Every run holds out 5% of the documents as a test split apart from the 5% of validation: verdicts read the
# test loss, selection (the sweep, the tuned trials) and the evaluation curves the validation loss.
PROTOCOL_TRAIN = ["data.test_fraction=0.05"]
MARGIN_NATS = 0.05  # the equivalence margin of a verdict: a rung holds its base's loss within 0.05 nats
# BERT's AdamW recipe clips the global gradient norm at 1.0 (Devlin et al.'s optimization.py); a scale's
# adamw_clip_norm (None: no clip) overrides it. LAMB normalises per layer and clips nothing (its paper).
ADAMW_CLIP_NORM = 1.0


def optimizer_overrides(opt: str, scale: dict) -> list[str]:
    """What an optimizer's rows add to every run: AdamW's global gradient clip."""
    clip = scale.get("adamw_clip_norm", ADAMW_CLIP_NORM)
    return [f"optimizer.grad_clip_norm={clip}"] if opt == "adamw" and clip is not None else []
# The ladders of every scale (rungs, seeds, grids, budgets): conf/ladders/lamb_table1.yaml.
SCALES = load_ladders("lamb_table1")["scales"]
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
        jobs = [Job([*PROTOCOL_TRAIN, *scale["train"], f"optimizer={opt}", *optimizer_overrides(opt, scale),
                     f"batch={base}", f"epochs={epochs}",
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
    parser.add_argument("--tuning", help="the tuned row's search at each tuned rung: 'grid' (the sqrt rule's lr x "
                        "1/4..4) or 'halton:N' (N quasi-random trials); default: the scale's")
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
    if args.tuning:
        try:
            P.tuning_trials(1.0, 0.0, args.tuning)  # refuses a bad spec before anything runs
        except ValueError as error:
            parser.error(str(error))
        scale = {**scale, "tuning": args.tuning}
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
    log.info("%s: %d job(s) at a time, %d torch thread(s) each", args.scale, jobs, runner.threads)

    with runner, runner.stop_on_signals():  # a signal checkpoints the runs and stops; the pool closes
        # 1. base learning rates
        if scale["sweep"]:
            lrs, sweep_record = sweep_base_lrs(runner, scale)
        elif isinstance(scale["lrs"], str):
            lrs, sweep_record = committed_lrs(scale["lrs"])
        else:
            lrs, sweep_record = dict(scale["lrs"]), {"note": f"fixed lrs at scale {args.scale} (no sweep)"}

        # 2. the ladder, LARS and the mixed batch: one pool; each optimizer's base rung on the target's seeds
        target = P.target_seeds(max(args.seeds or 0, scale["target_seeds"]))
        cell = target[:args.seeds or scale["seeds"]]
        common = [*PROTOCOL_TRAIN, *scale["train"]]

        def rung(opt: str, b: int, base: int) -> list[Job]:
            return [Job([*common, f"optimizer={opt}", *optimizer_overrides(opt, scale), f"optimizer.lr={lrs[opt]}",
                         f"batch={b}", f"seed={s}"],
                        runs / opt / f"batch={b},seed={s}") for s in (target if b == base else cell)]

        ladder = [j for opt in ("lamb", "adamw") for b in scale["ladder"] for j in rung(opt, b, scale["ladder"][0])]
        ladder += [j for b in scale["lars"] for j in rung("lars_paper", b, scale["lars"][0])]
        if scale["mixed"] is not None:
            ladder.append(Job([*common, f"optimizer.lr={lrs['lamb']}", *scale["mixed"], f"seed={cell[0]}"],
                              runs / "lamb_mixed" / f"seed={cell[0]}", experiment="lamb_mixed_batch"))
        runner.run_many(ladder)

        # 3. the tuned oracle: trials selected on validation, the best re-run on the cells' seeds
        tuned, tuned_record = tune(runner, scale, lrs, common, out / "tuned", cell)

    # 4. downstream (runs scored by an earlier, interrupted call keep their scores); diverged runs have no model
    run_dirs = [job.run_dir for job in ladder]
    if scale["finetune"] is not None:
        finetune(run_dirs, scale, runner, jobs)
    return _report(args, scale, out, clock, runner, run_dirs, lrs, sweep_record, tuned, tuned_record, jobs)


def finetune(run_dirs: list[Path], scale: dict, runner, jobs: int) -> None:
    """Every pretrained checkpoint fine-tuned with one recipe, and the first once from a random init."""
    scored = [d for d in run_dirs if (d / "model").is_dir()]
    t0 = time.perf_counter()
    first = scored[0]
    calls = []
    if read_json(first / DOWNSTREAM_RANDOM) is None:
        calls.append([str(first), "--random-init", *scale["finetune"]])  # both ways, once: the same config
    both_ways = bool(calls)
    todo = [d for d in scored if read_json(d / DOWNSTREAM) is None and not (both_ways and d == first)]
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


def _report(args, scale, out, clock, runner, run_dirs, lrs, sweep_record, tuned, tuned_record, jobs) -> Path:
    """5. records and report: lb-report over the ladder's runs, the protocol's section over them and the tuned
    rows (its notes), every run's small records beside them."""
    runs = out / "runs"
    results = Path(args.out) if args.out else REPO / scale["results"]
    if results.exists():
        shutil.rmtree(results)
    # the small records of every run, beside the report
    copy_records({d: d.relative_to(runs) for d in run_dirs}, results / "runs", (*RECORDS, DOWNSTREAM,
                                                                                  DOWNSTREAM_RANDOM))
    copy_records({job.run_dir: job.run_dir.relative_to(out) for job in tuned.values()}, results)
    atomic_write_json(results / "lr_sweep.json", sweep_record)
    wall = clock.total_s()
    atomic_write_json(results / "reproduce.json", {
        "command": f"make reproduce-table1 SCALE={args.scale}" + (f" SEEDS={args.seeds}" if args.seeds else ""),
        "wall_time_s": round(wall, 1), "calls": clock.calls, "jobs": jobs, "threads_per_job": runner.threads,
        "base_lrs": lrs, "run_folder": rel(out), "steps": runner.steps, "protocol": "v2",
        "target_seeds": P.target_seeds(max(args.seeds or 0, scale["target_seeds"])), "tuned": tuned_record,
        "skipped_runs": sum(step.get("action") == "skip" for step in runner.steps),
        "resumed_runs": sum(step.get("action") == "resume" for step in runner.steps),
        "diverged_runs": sum(run_action(d) == "diverged" for d in run_dirs),
    })
    # paths relative to where the driver runs (the repository, under make): the recorded command stays portable
    first = run_dirs[0]
    from largebatch.report.unigram import unigram_baseline_from_run

    unigram = unigram_baseline_from_run(first)
    section, record = protocol_section(results, run_dirs, runs, tuned, tuned_record, unigram, scale)
    atomic_write_json(results / "protocol.json", record)
    report.main([os.path.relpath(results / "runs"), "--out", os.path.relpath(results), "--title",
                 f"LAMB Table 1 at reduced scale ({args.scale}): {wall / 60:.1f} minutes on this machine"
                 + (f" over {clock.calls} calls of the driver (it resumes)" if clock.calls > 1 else ""),
                 "--unigram-from-config", os.path.relpath(first), "--notes", "\n".join(section)])
    log.info("done in %.1f min: %s", wall / 60, results)
    return results


def tune(runner, scale: dict, lrs: dict, common: list[str], root: Path, seeds: list[int]) -> tuple[dict, dict]:
    """The tuned oracle of LAMB and AdamW at the scale's ``tuned`` rungs: the declared trials around the sqrt
    rule's lr and warmup there (seed 0), the best by final validation loss re-run on ``seeds``. Returns
    ({(optimizer, batch, seed or "trial,..."): Job}, the record)."""
    if not scale["tuned"]:
        return {}, {}
    cfg = compose(["experiment=lamb_table1", *common])
    ref_batch, ref_warmup = cfg.scaling.ref_batch, cfg.schedule.warmup_epochs
    trials = {}
    for opt in ("lamb", "adamw"):
        for b in scale["tuned"]:
            k = b / ref_batch  # the ladder's rule (lamb_table1: legw): lr x sqrt k, warmup epochs x k
            for lr, w in P.tuning_trials(float(f"{lrs[opt] * k ** 0.5:.4g}"), ref_warmup * k, scale["tuning"]):
                trials[opt, b, f"trial,lr={lr:g}"] = Job(
                    [*common, f"optimizer={opt}", *optimizer_overrides(opt, scale), "scaling=none", f"optimizer.lr={lr:g}", f"schedule.warmup_epochs={w:g}",
                     f"batch={b}", "seed=0"], root / opt / f"batch={b}" / f"trial,lr={lr:g}")
    raw = {key: list(job.overrides) for key, job in trials.items()}  # before the runner adds its own
    runner.run_many(list(trials.values()))
    jobs, record = dict(trials), {}
    for opt in ("lamb", "adamw"):
        for b in scale["tuned"]:
            scored = {key[2]: finite_or_inf(L.value_of(read_metrics(job.run_dir), "eval/loss"))
                      for key, job in trials.items() if key[:2] == (opt, b) and run_action(job.run_dir) == "skip"}
            if not scored:
                continue
            best = min(scored, key=scored.get)
            chosen = raw[opt, b, best]
            lrs_tried = sorted(float(k.split("=")[1]) for k in scored)
            record.setdefault(opt, {})[str(b)] = {
                "trials": len(scored), "search": scale["tuning"], "chosen": best.removeprefix("trial,"),
                "lr_at_edge": float(best.split("=")[1]) in (lrs_tried[0], lrs_tried[-1]),
                "validation_loss_by_trial": {k.removeprefix("trial,"): v for k, v in scored.items()}}
            for s in seeds:
                jobs[opt, b, s] = Job([o for o in chosen if not o.startswith("seed=")] + [f"seed={s}"],
                                      root / opt / f"batch={b},seed={s}")
    runner.run_many([job for key, job in jobs.items() if not str(key[2]).startswith("trial")])
    return jobs, record


def protocol_section(results: Path, run_dirs: list[Path], runs: Path, tuned: dict, tuned_record: dict,
                     unigram: dict, scale: dict) -> tuple[list[str], dict]:
    """The protocol's verdicts over the ladder (test loss, intervals, each optimizer against its own fresh-seed
    base) and the tuned rows, for the top of table.md."""
    entries = []
    for d in run_dirs:
        rel_dir = d.relative_to(runs)
        opt = rel_dir.parts[0]
        if opt == "lamb_mixed":
            continue
        batch, seed = (int(p.split("=")[1]) for p in rel_dir.parts[1].split(","))
        entry = {"row": opt, "batch": batch, "seed": seed, "dir": results / "runs" / rel_dir,
                 "record": f"runs/{rel_dir}", "target": batch == min(scale["lars"] if opt == "lars_paper" else
                                                                     scale["ladder"])}
        entries.append(entry)
        if entry["target"] and opt in tuned_record:
            entries.append({**entry, "row": f"{opt} (tuned)"})  # the tuned row's base rung is its optimizer's
    for (opt, b, s), job in tuned.items():
        folder = job.run_dir.relative_to(runs.parent)  # tuned/<optimizer>/batch=B[/trial,lr=X | ,seed=S]
        trial = str(s).startswith("trial")
        entries.append({"row": f"{opt} (tuned)", "batch": b, "seed": 0 if trial else s, "trial": trial,
                        "dir": results / folder, "record": str(folder)})
    floor = unigram.get("test", unigram)
    spec = L.Spec("eval/loss", "test/loss", False, MARGIN_NATS, absolute=True, baseline=floor["loss"],
                  baseline_name="unigram baseline on the test tokens")
    tunings = {f"{opt} (tuned)": f"{next(iter(r.values()))['trials']} trials per rung, {scale['tuning']}, selected "
               "on validation" for opt, r in tuned_record.items()}
    lines, record = L.rows_section(entries, spec, tunings=tunings, fit_rows=tuple(tunings) or ("lamb",),
                                   plot=results / "protocol_steps.png")
    edges = [f"{opt} at {b}" for opt, r in tuned_record.items() for b, x in r.items() if x["lr_at_edge"]]
    head = ["## The protocol's verdicts (docs/protocol.md)", "",
            f"Test loss (held-out documents apart from the validation ones that select), margin {MARGIN_NATS} nats; "
            "each optimizer's target is its base rung on fresh seeds."
            + (f" AdamW clips the global gradient norm at {clip:g} (BERT's recipe; the scale's adamw_clip_norm)."
               if (clip := scale.get("adamw_clip_norm", ADAMW_CLIP_NORM)) is not None else " AdamW clips nothing.")
            + (f" The tuned best lr sits at the edge of its search for {', '.join(edges)}: a lower bound there."
               if edges else ""), ""]
    return head + lines, {"spec": vars(spec), "rows": record, "tuned": tuned_record}


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:  # a config, data or run-folder problem: one `error:` line
        fail(error)
