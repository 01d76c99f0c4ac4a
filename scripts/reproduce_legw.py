"""Reproduce LEGW's claims (arXiv 1901.08256): `make reproduce-legw TASK=ptb|mnist_lstm|seq2seq|resnet SCALE=...`.

LEGW: with the lr scaled by sqrt(k) and the warmup's EPOCHS by k when the batch grows k-fold (so the warmup's
steps stay constant), LSTM batches scale 64x (GNMT 16x) at a fixed epoch budget without tuning, where linear
scaling (lr x k, Goyal's recipe) does not. Every task follows the protocol of docs/protocol.md
(largebatch/protocol.py):

  1. one base configuration at the base batch, selected on VALIDATION: the lr from a half-decade grid at the
     base's warmup, widened past an edge until the best is interior (:func:`largebatch.drivers.widening_sweep`);
     then the warmup, in epochs, from a small grid at that lr, widened the same way (doubling, down to 0, up to
     what the top rung can hold). Sweep runs use seed 0; every value tried goes to ``sweep.json``.
  2. the target: the chosen base config on ``target_seeds`` FRESH seeds (never the sweep's run).
  3. untuned, the ladder k = batch / base batch under each rule: legw (lr x sqrt k, warmup epochs x k), sqrt
     (lr x sqrt k), linear (lr x k with Goyal's warmup share, 5/90 of the run) and none, on ``seeds`` seeds;
     the rules are identical at k = 1, so the base rung is the target, shared.
  4. the tuned oracle at the ``tuned`` rungs: a declared search (:func:`largebatch.protocol.tuning_trials`)
     selected on validation, its best trial re-run on the seeds.
  5. the report (:mod:`largebatch.report.legw`): runs.csv, table.md (test metric, 95% intervals, interval
     verdicts, steps to result, the McCandlish fit, B_simple by quarter), plots, provenance.json and each
     run's small records, in ``results/legw/<task>/`` (SCALE=smoke: outputs/legw_smoke/<task>/).
  6. opt-in, ``--steps-to-result RULE``: the base rung's and RULE's runs again with ``stop_at`` at the strictest
     validation target, so each ends at its steps to result; steps_to_result.md says what that saved
     (:mod:`largebatch.report.steps_to_result`).

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

from largebatch import protocol as P  # noqa: E402
from largebatch.config import compose  # noqa: E402
from largebatch.drivers import (  # noqa: E402
    CHECKPOINT_EVERY_EPOCHS,
    Clock,
    DriverStopped,
    Job,
    Runner,
    finite_or_inf,
    load_ladders,
    next_lr,
    rel,
    widening_sweep,
)
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json  # noqa: E402
from largebatch.report import ladder as L  # noqa: E402
from largebatch.report import legw as legw_report  # noqa: E402
from largebatch.report import steps_to_result as stop_report  # noqa: E402
from largebatch.runfolder import copy_records, read_json, read_metrics, run_action  # noqa: E402

RULES = ("legw", "sqrt", "linear", "none")

# The workloads: the config that picks each (with its validation split), the metric that selects (validation)
# and the one the table reports (test), as logged by largebatch/tasks/*.py; the equivalence margin of a
# verdict, relative to the target; evaluations averaged at a budget's end (classification: 3); the trivial
# baseline the base must beat. In this order a call without --task runs them (together, the first first).
FASHION_VALID = "data.valid_size=5000"  # 5,000 of Fashion-MNIST's 60,000 training images, a fixed permutation
TASKS = {
    "mnist_lstm": dict(base=["experiment=mnist_lstm", "data=fashion_mnist", FASHION_VALID], select="eval/accuracy",
                       report="test/accuracy", higher_is_better=True, margin=0.01, last=3,
                       baseline=(0.1, "majority class (Fashion-MNIST's test set is balanced)"),
                       paper="MNIST-LSTM: batch 128 -> 8192 (64x) at the base's accuracy"),
    "ptb": dict(base=["experiment=ptb_zaremba_small"], select="eval/ppl", report="test/ppl", higher_is_better=False,
                margin=0.01, last=1, baseline=None,
                paper="PTB small LSTM (Zaremba): batch 20 -> 1280 (64x) at the base's perplexity"),
    "resnet": dict(base=["experiment=resnet20_fashion", "schedule.warmup_init_lr=0.0", FASHION_VALID],
                   select="eval/accuracy", report="test/accuracy", higher_is_better=True, margin=0.01, last=3,
                   baseline=(0.1, "majority class (Fashion-MNIST's test set is balanced)"),
                   paper="ImageNet ResNet-50 in LEGW's appendix; here ResNet-20 on Fashion-MNIST, 32x"),
    # Valid token perplexity, not GNMT's BLEU: the models these budgets train score BLEU below 1, which is noise
    # (experiments/legw/README.md); every run still logs its greedy valid BLEU beside the perplexity. No test
    # perplexity is logged along the way, so this table reports validation (and says so).
    "seq2seq": dict(base=["model=seq2seq", "data=verses"], select="eval/ppl", report="eval/ppl",
                    higher_is_better=False, margin=0.01, last=1, baseline=None,
                    paper="GNMT: batch 128 -> 2048 (16x) at the base's BLEU; here 32 -> 512, "
                    "scored by valid perplexity (BLEU is ~0 at this scale)"),
}
# The ladders (rungs, seeds, grids, budgets per scale and task) and the protocol's defaults: conf/ladders/legw.yaml.
LADDERS = load_ladders("legw")
PROTOCOL, SCALES = LADDERS["protocol"], LADDERS["scales"]
log = logging.getLogger("reproduce_legw")


def setting(scale: dict, task: str, key: str):
    """A protocol setting: the task's spec, else the scale's, else :data:`PROTOCOL`'s."""
    spec = scale["tasks"][task]
    return spec[key] if key in spec else scale.get(key, PROTOCOL[key])


def rule_overrides(rule: str, base_batch: int, lr: float, warmup_epochs: float) -> list[str]:
    """The untuned scaling of the base configuration to any batch: ``rule`` from ``base_batch``."""
    return [f"scaling={rule}", f"scaling.ref_batch={base_batch}", f"optimizer.lr={lr:g}",
            f"schedule.warmup_epochs={warmup_epochs:g}"]


def run_overrides(task: str, scale: dict, rule: str, batch: int, lr: float, warmup: float, seed: int) -> list[str]:
    """Every override of one run of ``task`` (the rule's scaling from the base batch, at ``batch``)."""
    spec = scale["tasks"][task]
    return [*TASKS[task]["base"], *spec["train"], *rule_overrides(rule, spec["ladder"][0], lr, warmup),
            f"batch={batch}", f"seed={seed}"]


def score_run(task: str, run_dir: Path, last: int) -> float:
    """A run's selection score, lower is better: its final VALIDATION metric (the mean of its last ``last``
    evaluations), negated where higher is better; +inf for a run that diverged or failed."""
    key = TASKS[task]["select"]
    if run_action(run_dir) != "skip":
        return float("inf")
    value = finite_or_inf(L.value_of(read_metrics(run_dir), key, last))
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
    then the warmup at the chosen lr, each by a widening grid scored on validation (:func:`score_run`)."""
    spec = scale["tasks"][task]
    base = spec["ladder"][0]
    epochs = runner.epochs(task)
    limit = epochs / (spec["ladder"][-1] / base)  # LEGW's warmup at the top rung may not outlast the run
    last = TASKS[task]["last"]

    def run_at(pairs: list[tuple[float, float]]) -> list[float]:
        jobs = [Job(run_overrides(task, scale, "legw", base, lr, w, 0), sweep_dir(work, lr, w)) for lr, w in pairs]
        runner.run_many(jobs)
        return [score_run(task, job.run_dir, last) for job in jobs]

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
        "task": task, "batch": base, "epochs": epochs, "metric": TASKS[task]["select"], "seed": 0,
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


def rung_seeds(task: str, scale: dict, seeds: int | None = None) -> tuple[list[int], list[int]]:
    """(the target's seeds, every other cell's): fresh seeds, never the sweep's seed 0."""
    target = P.target_seeds(setting(scale, task, "target_seeds") if seeds is None else max(seeds, 2))
    return target, target[:setting(scale, task, "seeds") if seeds is None else seeds]


def ladder_jobs(task: str, scale: dict, work: Path, lr: float, warmup: float, epochs: float,
                seeds: int | None = None) -> dict:
    """{(row, batch, seed): Job}: the target ("base", fresh seeds at the base batch) and every rule's rungs. With
    no base warmup LEGW's runs are sqrt's (one folder, run once); linear warms up for Goyal's share of the run
    (``goyal_warmup``), or for the base's warmup."""
    ladder = scale["tasks"][task]["ladder"]
    target, cell = rung_seeds(task, scale, seeds)
    jobs = {("base", ladder[0], s): Job(run_overrides(task, scale, "legw", ladder[0], lr, warmup, s),
                                        work / "runs" / "base" / f"batch={ladder[0]},seed={s}") for s in target}
    linear_warmup = max(warmup, P.GOYAL_WARMUP_SHARE * epochs) if setting(scale, task, "goyal_warmup") else warmup
    rungs = scale["tasks"][task].get("rules", {})
    fewer = scale["tasks"][task].get("seeds_by_rung", {}) if seeds is None else {}
    for rule in RULES:
        for b in rungs.get(rule, ladder[1:]):
            for s in cell[:fewer.get(b, len(cell))]:
                ran = "sqrt" if rule == "legw" and warmup == 0 else rule  # k x 0 epochs: LEGW is sqrt
                w = linear_warmup if rule == "linear" else warmup
                jobs[rule, b, s] = Job(run_overrides(task, scale, ran, b, lr, w, s),
                                       work / "runs" / ran / f"batch={b},seed={s}")
    return jobs


def tuned_trials(task: str, scale: dict, lr: float, warmup: float, epochs: float, batch: int) -> list[tuple]:
    """The tuned row's declared search at ``batch``: around LEGW's (lr, warmup) there, with a second warmup
    (the base's epochs when LEGW's differ, else Goyal's share of the run)."""
    k = batch / scale["tasks"][task]["ladder"][0]
    legw_lr, legw_warmup = lr * k ** 0.5, warmup * k
    alt = warmup if legw_warmup != warmup else round(P.GOYAL_WARMUP_SHARE * epochs, 6)
    return P.tuning_trials(float(f"{legw_lr:.4g}"), legw_warmup, setting(scale, task, "tuning"), warmup_alt=alt)


def tuned_overrides(task: str, scale: dict, batch: int, lr: float, warmup: float, seed: int) -> list[str]:
    spec = scale["tasks"][task]
    return [*TASKS[task]["base"], *spec["train"], "scaling=none", f"scaling.ref_batch={batch}", f"optimizer.lr={lr:g}",
            f"schedule.warmup_epochs={warmup:g}", f"batch={batch}", f"seed={seed}"]


def tune(runner: Runner, task: str, scale: dict, work: Path, lr: float, warmup: float, epochs: float,
         seeds: int | None = None) -> tuple[dict, dict]:
    """The tuned oracle: every trial at its rung (seed 0), the best by validation re-run on the cells' seeds.
    ({(row, batch, seed): Job} of trials ("tuned_trial") and re-runs ("tuned"), the record)."""
    _, cell = rung_seeds(task, scale, seeds)
    fewer = scale["tasks"][task].get("seeds_by_rung", {}) if seeds is None else {}
    trials, record = {}, {}
    for b in setting(scale, task, "tuned"):
        for t_lr, t_w in tuned_trials(task, scale, lr, warmup, epochs, b):
            trials[b, t_lr, t_w] = Job(tuned_overrides(task, scale, b, t_lr, t_w, 0),
                                       work / "runs" / "tuned" / f"batch={b}" / f"trial,lr={t_lr:g},warmup={t_w:g}")
    runner.run_many(list(trials.values()))
    jobs = {}
    for b in setting(scale, task, "tuned"):
        scored = {(t_lr, t_w): score_run(task, job.run_dir, TASKS[task]["last"])
                  for (tb, t_lr, t_w), job in trials.items() if tb == b}
        best = min(scored, key=scored.get)
        sign = -1 if TASKS[task]["higher_is_better"] else 1
        lrs = sorted({x for x, _ in scored})
        record[b] = {"trials": len(scored), "chosen": {"lr": best[0], "warmup_epochs": best[1]},
                     "lr_at_edge": best[0] in (lrs[0], lrs[-1]),
                     "validation_by_trial": {f"lr={x:g},warmup={w:g}": sign * v for (x, w), v in scored.items()}}
        for (tb, t_lr, t_w), job in trials.items():
            if tb == b:
                jobs["tuned_trial", b, f"{t_lr:g},{t_w:g}"] = job
        for s in cell[:fewer.get(b, len(cell))]:
            jobs["tuned", b, s] = Job(tuned_overrides(task, scale, b, *best, s),
                                      work / "runs" / "tuned" / f"batch={b},seed={s}")
    runner.run_many([j for (row, *_), j in jobs.items() if row == "tuned"])
    return jobs, record


STUDY = "steps_to_result"  # the stop_at study's folder, in the work folder and in the results folder


def validation_target(task: str, scale: dict, jobs: dict) -> float | None:
    """The strictest validation target of the steps-to-result table: the base rung's runs' mean final
    validation metric (None where no base run finished)."""
    spec = task_spec(task, scale)
    base = [{"row": row, "batch": b, "seed": s, "dir": job.run_dir} for (row, b, s), job in jobs.items() if row == "base"]
    targets = L.step_targets(spec, L.load(base, spec.select_key, spec.report_key))
    return targets[-1] if targets else None


def steps_to_result_jobs(task: str, scale: dict, work: Path, lr: float, warmup: float, epochs: float,
                         seeds: int | None, rules: list[str], target: float) -> dict:
    """{(row, batch, seed): Job}: the base rung's runs and ``rules``' rungs again, each ending at the first
    evaluation that strictly beats ``target`` on the task's selection metric, in work/steps_to_result/ (a
    run folder holds one config: the full runs keep theirs in work/runs/)."""
    select = TASKS[task]["select"]
    stop = [f"stop_at={stop_report.stop_value(target, TASKS[task]['higher_is_better'])!r}", f"stop_metric={select}"]
    full = ladder_jobs(task, scale, work, lr, warmup, epochs, seeds)  # fresh jobs: run_many completes overrides
    return {key: Job([*job.overrides, *stop], work / STUDY / job.run_dir.relative_to(work / "runs"))
            for key, job in full.items() if key[0] in ("base", *rules)}


def write_study(task: str, args, study: dict, target: float, results: Path) -> Path:
    """Copy the stopped runs' records beside the full runs' and write steps_to_result.md and .json."""
    entries = []
    for (row, b, s), job in sorted(study.items(), key=lambda item: (ROW_ORDER.index(item[0][0]), *item[0][1:])):
        record = f"batch={b},seed={s}"
        copy_records({job.run_dir: f"{STUDY}/{row}/{record}"}, results)
        entries.append({"row": row, "batch": b, "seed": s, "dir": results / STUDY / row / record,
                        "full": results / "runs" / row / record})
    out = stop_report.write(entries, results, title=f"Steps to result with stop_at ({args.scale}): {task}",
                            select_key=TASKS[task]["select"], target=target,
                            higher_is_better=TASKS[task]["higher_is_better"], names=legw_report.RULE_NAMES)
    for r in out["runs"]:
        if not r.agrees:
            log.warning("%s %s %d seed %d stopped at step %s, its full run beats the target at %s", task, r.row,
                        r.batch, r.seed, r.step, r.full_step)
    return out["files"]["steps_to_result.md"]


def task_spec(task: str, scale: dict | None = None, v1: bool = False) -> L.Spec:
    """The report's protocol settings for ``task`` (v1: the committed runs' single eval metric)."""
    t = TASKS[task]
    baseline = t["baseline"] or (None, "")
    budgets = tuple(setting(scale, task, "budgets")) if scale else (None,)
    if v1:
        metric = V1_METRIC[task]
        return L.Spec(metric, "test/ppl" if task == "ptb" else metric, t["higher_is_better"], t["margin"], last=1,
                      baseline=baseline[0], baseline_name=baseline[1])
    return L.Spec(t["select"], t["report"], t["higher_is_better"], t["margin"], last=t["last"], budgets=budgets,
                  baseline=baseline[0], baseline_name=baseline[1])


def reproduce_task(task: str, args, scale: dict, runner: LegwRunner, work: Path, results: Path,
                   clock: Clock, together: list[str] = ()) -> Path:
    """Sweep, target, ladder, tuned row and report of one workload; returns its results folder."""
    lr, warmup, record = sweep_base(runner, task, scale, work)
    epochs = runner.epochs(task)
    jobs = ladder_jobs(task, scale, work, lr, warmup, epochs, args.seeds)
    runner.run_many(list({job.run_dir: job for job in jobs.values()}.values()))  # a folder shared by rules: once
    tuned_jobs, tuned_record = tune(runner, task, scale, work, lr, warmup, epochs, args.seeds)
    jobs.update(tuned_jobs)
    record["tuned"] = {str(b): r for b, r in tuned_record.items()}
    study, target = {}, None
    if args.steps_to_result:
        target = validation_target(task, scale, jobs)
        if target is None:
            log.warning("%s: no base run finished, so there is no target: no steps-to-result study", task)
        else:
            study = steps_to_result_jobs(task, scale, work, lr, warmup, epochs, args.seeds, args.steps_to_result, target)
            runner.run_many(list({job.run_dir: job for job in study.values()}.values()))

    # A call that found every run finished only re-renders: it neither counts as a call nor shared the workers.
    def trained_in_this_call(name: str) -> bool:
        return any(run_dir.is_relative_to(work.parent / name) for run_dir in runner.started)

    if trained_in_this_call(task):
        clock.shared_with.update(t for t in together if t != task and trained_in_this_call(t))
    else:
        clock.idle()
    others = sorted(clock.shared_with)
    if results.exists():
        shutil.rmtree(results)
    entries = []
    for (row, b, s), job in jobs.items():
        name = job.run_dir.name if row == "tuned_trial" else f"batch={b},seed={s}"
        folder = f"runs/tuned/batch={b}/{name}" if row == "tuned_trial" else f"runs/{row}/{name}"
        entries.append({"row": "tuned" if row == "tuned_trial" else row, "batch": b, "seed": 0 if row == "tuned_trial"
                        else s, "trial": row == "tuned_trial", "dir": job.run_dir, "record": folder})
    entries.sort(key=entry_order)
    for e in entries:  # one by one: with no base warmup a sqrt run is also the legw rung's
        copy_records({e["dir"]: e["record"]}, results)
    atomic_write_json(results / "sweep.json", record)
    # Training time of every run of the task (sweep included; the steps-to-result study's runs are counted in its
    # own file), from the runs' own summaries, and the driver's elapsed time: run with other tasks, it shares the
    # workers with them, so the first is the task's cost.
    run_s = sum(float(s.get("wall_time_s") or 0.0) for path in work.glob("**/summary.json")
                if not path.is_relative_to(work / STUDY) and isinstance(s := read_json(path), dict))
    tuned = setting(scale, task, "tuned")
    tuning = (f"{next(iter(tuned_record.values()))['trials']} trials per rung, {setting(scale, task, 'tuning')}, "
              "selected on validation") if tuned_record else None
    notes = []
    edges = [str(b) for b, r in tuned_record.items() if r["lr_at_edge"]]
    if edges:
        notes.append(f"The tuned row's best lr sits at the edge of its search at batch {', '.join(edges)}: a wider "
                     "search could do better there, so the oracle is a lower bound.")
    if not TASKS[task]["report"].startswith("test/"):
        notes.append(f"This task logs no test metric along the way: the table reports validation "
                     f"({TASKS[task]['report']}), the split that also selected the base config.")
    legw_report.write_legw_report(
        [{**e, "dir": results / e["record"]} for e in entries], results, task=task, spec=task_spec(task, scale),
        title=f"LEGW at reduced scale ({args.scale}): {task}, {run_s / 60:.1f} min of training in all ({runner.jobs} "
        f"at a time: {run_s / 60 / runner.jobs:.1f} min of the machine), {clock.total_s() / 60:.1f} min of the driver"
        + (f" over {clock.calls} calls (it resumes)" if clock.calls > 1 else "")
        + (f", sharing its workers with {', '.join(others)}" if others else ""),
        claim=TASKS[task]["paper"], tuning=tuning, protocol_notes=notes,
        provenance={"command": f"make reproduce-legw TASK={task} SCALE={args.scale}", "protocol": "v2", "scale": args.scale,
                    "tuning_text": tuning, "base_lr": lr,
                    "wall_time_s": round(clock.total_s(), 1), "calls": clock.calls, "jobs": runner.jobs,
                    "run_seconds": round(run_s, 1), "run_together_with": others,
                    "threads_per_job": runner.threads, "base_warmup_epochs": warmup,
                    "target_seeds": rung_seeds(task, scale, args.seeds)[0],
                    "seeds": rung_seeds(task, scale, args.seeds)[1], "tuned_rungs": list(tuned),
                    "work_folder": rel(work), "sweep": record,
                    "steps": [s for s in runner.steps if s.get("run_dir", "").startswith(rel(work) + "/")]})
    if study:
        log.info("%s: %s", task, rel(write_study(task, args, study, target, results)))
    log.info("%s: %s", task, rel(results))
    return results


# ----------------------------------------------------------------------------- the committed v1 tables
# The committed ladders were run before the protocol (results/legw/<task>/, protocol v1): their one eval
# metric is the validation split for PTB and seq2seq and the TEST images for MNIST-LSTM and ResNet, and their
# base seed 0 is the sweep's winning run. They are re-rendered under the protocol's statistics, and say so.
V1_METRIC = {"mnist_lstm": "eval/accuracy", "ptb": "eval/ppl", "resnet": "eval/accuracy", "seq2seq": "eval/ppl"}


def v1_notes(task: str) -> list[str]:
    notes = ["**Protocol v1** (run before docs/protocol.md): the target's seed 0 is the sweep's winning run (selection "
             "bias: it is the better base seed), the middle rungs have one seed, and the tuned row is missing. "
             "The verdicts below are the protocol's interval verdicts on these runs; `make reproduce-legw` under the "
             "protocol re-runs them."]
    if task in ("mnist_lstm", "resnet"):
        notes.append("Selection read the test images the table reports (these runs had no validation split).")
    if task == "seq2seq":
        notes.append("The table reports validation perplexity, the split that also selected the base config.")
    return notes


ROW_ORDER = ("base", *RULES, "tuned")


def entry_order(e: dict) -> tuple:
    """The order of a table's runs (the driver's and a re-render's): row, batch, trials before seeds, seed."""
    return ROW_ORDER.index(e["row"]), e["batch"], not e.get("trial"), e["seed"], e["record"]


def folder_entries(folder: Path) -> list[dict]:
    """A results folder's run entries, from its runs/<row>/batch=B,seed=S and runs/tuned/batch=B/trial,... ."""
    entries = []
    for run in (folder / "runs").glob("*/batch=*,seed=*"):
        batch, seed = (int(part.split("=")[1]) for part in run.name.split(","))
        entries.append({"row": run.parent.name, "batch": batch, "seed": seed, "dir": run,
                        "record": f"runs/{run.parent.name}/{run.name}"})
    for run in (folder / "runs" / "tuned").glob("batch=*/trial,*"):
        entries.append({"row": "tuned", "batch": int(run.parent.name.split("=")[1]), "seed": 0, "trial": True,
                        "dir": run, "record": f"runs/tuned/{run.parent.name}/{run.name}"})
    return sorted(entries, key=entry_order)


def rerender(task: str, folder: Path) -> dict:
    """Render a committed table again from the run records beside it: a v1 table under the protocol's
    statistics (with its caveats), a v2 table as its driver rendered it."""
    record = read_json(folder / "provenance.json") or {}
    title = (folder / "table.md").read_text().splitlines()[0].removeprefix("# ").split(" — protocol v1")[0]
    entries = folder_entries(folder)
    if record.get("protocol") != "v1":
        return legw_report.write_legw_report(
            entries, folder, task=task, spec=task_spec(task, SCALES[record.get("scale", "small")]), title=title,
            claim=TASKS[task]["paper"], tuning=record.get("tuning_text"),
            protocol_notes=record.get("protocol_notes", []), provenance=record)
    if record.get("base_warmup_epochs") == 0:  # the legw rungs were sqrt's runs, copied under legw/
        entries = [e for e in entries if e["row"] != "legw"] + [{**e, "row": "legw"} for e in entries if e["row"] == "sqrt"]
        entries.sort(key=entry_order)
    keep = {k: record[k] for k in ("command", "base_lr", "base_warmup_epochs", "wall_time_s", "calls", "jobs",
                                   "run_seconds", "run_together_with", "threads_per_job", "seeds", "work_folder",
                                   "sweep", "steps") if k in record}
    return legw_report.write_legw_report(entries, folder, task=task, spec=task_spec(task, v1=True),
                                         title=f"{title} — protocol v1", claim=TASKS[task]["paper"],
                                         protocol_notes=v1_notes(task), provenance={**keep, "protocol": "v1"},
                                         fresh_target=False)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), action="append",
                        help="a workload (repeat for several; default: all four)")
    parser.add_argument("--scale", choices=list(SCALES), default="small")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of every cell, the target's included (at "
                        "least 2 there; default: the scale's, else 3 for the target and 2 elsewhere)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the scale's, else one "
                        "per core, one torch thread each)")
    parser.add_argument("--out", help="results root, one folder per task below it (default: the scale's)")
    parser.add_argument("--work", help="runs root (default: outputs/legw/<scale>); a second call with the same "
                        "folder skips finished runs and resumes unfinished ones")
    parser.add_argument("--tuning", help="the tuned row's search at each tuned rung: 'grid' (lr x 1/4..4, two "
                        "warmups) or 'halton:N' (N quasi-random trials); default: the scale's")
    parser.add_argument("--steps-to-result", choices=RULES, action="append", nargs="?", const="legw", metavar="RULE",
                        help="also run the base rung's and RULE's runs (default legw; repeat for several) again with "
                        "stop_at at the strictest validation target, in <work>/<task>/steps_to_result/, and write "
                        "steps_to_result.md: steps, samples and seconds to the target and the compute it saved. Give "
                        "it on every call: the results folder is written afresh")
    parser.add_argument("--rerender", action="store_true", help="train nothing: render the committed tables "
                        "(results/legw/<task>/) again from their run records (protocol v1 ones under the protocol's "
                        "statistics, with their caveats)")
    args = parser.parse_args(argv)
    if args.rerender:
        root = Path(args.out) if args.out else REPO / SCALES["small"]["results"]
        return [rerender(task, root / task)["files"]["table.md"].parent for task in args.task or list(TASKS)]
    if args.scale == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("SCALE=gpu trains on one CUDA device and this machine has none; its plans: "
                     "experiments/legw/README.md")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    scale = SCALES[args.scale]
    if args.tuning:
        try:
            P.tuning_trials(1.0, 0.0, args.tuning)  # refuses a bad spec before anything runs
        except ValueError as error:
            parser.error(str(error))
        scale = {**scale, "tuning": args.tuning, "tasks": {t: {k: v for k, v in spec.items() if k != "tuning"}
                                                           for t, spec in scale["tasks"].items()}}
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
