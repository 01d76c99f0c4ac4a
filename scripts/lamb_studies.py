"""What this machine can test of LAMB's Table 1: `make lamb-studies`.

Three studies on the Table 1 workload (experiment=lamb_table1: BERT-tiny, the bundled corpus, seq 32, 38,912
samples a run; the committed sweep's base lrs at batch 2, results/lamb_table1/lr_sweep.json; test loss on the
held-out documents, selection on validation; AdamW clips the global norm at 1.0 as BERT's recipe):

  1. lr robustness at the top rung (128): LAMB and AdamW at {1/2, 1, 2, 4, 8} x the sqrt rule's lr, 2 fresh
     seeds each. LAMB's paper says its layer-wise trust ratio lets large batches take large learning rates;
     the table shows, per optimizer, the multipliers whose loss stays within 0.05 nats of its best multiplier.
  2. one long run (LAMB, batch 64, 2 epochs = 6x the ladder's budget) logging B_simple over training: how far
     the gradient noise scale rises, i.e. whether a longer CPU ladder could keep its rungs below it.
  3. the tuned oracle (Nado et al.'s comparison) at 64, 16 and 4, in that order: LAMB and AdamW each given the
     same declared search (halton:3 around the sqrt rule's lr, selected on validation, the best re-run on 2
     fresh seeds), then compared head to head with a Welch interval.

    python scripts/lamb_studies.py [--study lr --study long --study tuned] [--tuned-batches 64,16] [--report]

Runs live in outputs/lamb_table1/studies/ (rerun: finished runs skipped, others resumed); the report and each
run's small records go to results/lamb_studies/. --report renders from the runs finished so far.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import reproduce_table1 as T1  # noqa: E402

from largebatch import protocol as P  # noqa: E402
from largebatch.drivers import Job, rel  # noqa: E402
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from largebatch.report import ladder as L  # noqa: E402
from largebatch.runfolder import copy_records, read_json, read_metrics, read_plan, run_action  # noqa: E402
from largebatch.tracking import environment  # noqa: E402

TOP = 128
MULTIPLIERS = (0.5, 1, 2, 4, 8)
SEEDS = (1, 2)
OPTIMIZERS = ("lamb", "adamw")
LR_EVALS = "eval_every_epochs=0.0416666667"  # 8 evaluations a run (the ladder's 16 double its cost at 128)
LONG = dict(optimizer="lamb", batch=64, epochs=2.0, eval_every_epochs=0.125, seed=1)
TUNED_BATCHES = (64, 16, 4)
SCALE = {"tuned": [], "tuning": "halton:3", "adamw_clip_norm": T1.ADAMW_CLIP_NORM}
COMMON = list(T1.PROTOCOL_TRAIN)
log = logging.getLogger("lamb_studies")


class ReportOnly(T1.Runner):
    """--report: trains nothing (the tuned oracle's selection reads the trials finished so far)."""

    def run_many(self, jobs, in_process=False):
        return [None] * len(jobs)


def base_lrs() -> dict:
    return T1.committed_lrs("results/lamb_table1/lr_sweep.json")[0]


def lr_jobs(work: Path, lrs: dict) -> dict:
    """{(optimizer, multiplier, seed): Job} at the top rung; the experiment's legw rule scales lr x sqrt(64)."""
    return {(opt, m, s): Job([*COMMON, f"optimizer={opt}", *T1.optimizer_overrides(opt, SCALE),
                              f"optimizer.lr={lrs[opt] * m:g}", f"batch={TOP}", f"seed={s}", LR_EVALS],
                             work / "lr_robustness" / opt / f"x{m:g},seed={s}")
            for opt in OPTIMIZERS for m in MULTIPLIERS for s in SEEDS}


def long_job(work: Path, lrs: dict) -> Job:
    o = LONG["optimizer"]
    return Job([*COMMON, f"optimizer={o}", f"optimizer.lr={lrs[o]:g}", f"batch={LONG['batch']}",
                f"epochs={LONG['epochs']:g}", f"eval_every_epochs={LONG['eval_every_epochs']:g}",
                f"seed={LONG['seed']}"], work / "long" / f"{o},batch={LONG['batch']},epochs={LONG['epochs']:g}")


def test_loss(run_dir: Path) -> float | None:
    return L.value_of(read_metrics(run_dir), "test/loss") if run_action(run_dir) == "skip" else None


def floor_mark(values: list, floor: float | None) -> str:
    """A cell's mark against the unigram baseline: no better than it (learned only token frequencies), or
    within two margins of it (barely trained: a comparison with it says little)."""
    v = [x for x in values if x is not None]
    if floor is None or not v:
        return ""
    if not P.beats_baseline(v, floor, higher_is_better=False):
        return " ⚠ not below the unigram"
    return " ⚠ barely below the unigram" if floor - sum(v) / len(v) < 2 * T1.MARGIN_NATS else ""


def cell(values: list, n_planned: int) -> str:
    v = [x for x in values if x is not None]
    iv = P.t_interval(v)
    text = iv.text() if iv else "—"
    return text + (f" ({n_planned - len(v)} of {n_planned} not finite or not run)" if len(v) < n_planned else "")


def lr_section(jobs: dict, floor: float | None = None) -> tuple[list[str], list[str], dict]:
    """The lr robustness table: each (optimizer, multiplier) cell with its verdict against the optimizer's own
    best multiplier (within the margin), the ranges held, and the headline per optimizer; a cell no better
    than the unigram baseline (``floor``) is marked: that model learned nothing but token frequencies."""
    vals = {key: test_loss(job.run_dir) for key, job in jobs.items()}
    heads, record, verdicts = [], {}, {}
    for opt in OPTIMIZERS:
        by_m = {m: [x for x in (vals[opt, m, s] for s in SEEDS) if x is not None] for m in MULTIPLIERS}
        means = {m: sum(v) / len(v) for m, v in by_m.items() if v}
        if not means:
            continue
        best = min(means, key=means.get)
        for m in MULTIPLIERS:
            verdicts[opt, m] = P.verdict(by_m[m], by_m[best], T1.MARGIN_NATS, False) if m != best else None
        held = [m for m in MULTIPLIERS if m == best or verdicts[opt, m].word == "holds"]
        possible = [m for m in MULTIPLIERS if m == best or verdicts[opt, m].word not in ("fails", "missing")]
        record[opt] = {"best": best, "holds": held, "not_failing": possible,
                       "by_multiplier": {f"{m:g}": [vals[opt, m, s] for s in SEEDS] for m in MULTIPLIERS},
                       "verdicts": {f"{m:g}": verdicts[opt, m].text() if verdicts[opt, m] else "best"
                                    for m in MULTIPLIERS}}
        trained = [m for m in MULTIPLIERS if floor is None or P.beats_baseline(by_m[m], floor, False)]
        record[opt]["trains_at"] = trained
        heads.append(f"- **{opt}**: trains (every seed below the unigram) at "
                     f"{', '.join(f'{m:g}x' for m in trained) or 'no multiplier'} of the sqrt rule's lr; best at "
                     f"{best:g}x ({means[best]:.4f} nats); within {T1.MARGIN_NATS} nats of the best, proven at "
                     f"{', '.join(f'{m:g}x' for m in held)}, not ruled out at {', '.join(f'{m:g}x' for m in possible)}.")
    if len(record) == 2 and floor is not None:
        top = {opt: max(r["trains_at"], default=None) for opt, r in record.items()}
        word = ("larger" if (top["lamb"] or 0) > (top["adamw"] or 0) else
                "the same" if top["lamb"] == top["adamw"] else "smaller")
        heads.append(f"- LAMB tolerates {word} learning rates than AdamW here, relative to each one's sqrt-rule lr: "
                     f"the largest multiplier that trains is {top['lamb'] or 'none'}x for LAMB, "
                     f"{top['adamw'] or 'none'}x for AdamW (the paper's mechanism predicts larger for LAMB).")

    def cell_of(opt: str, m: float) -> str:
        text = cell([vals[opt, m, s] for s in SEEDS], len(SEEDS))
        v = verdicts.get((opt, m))
        text += floor_mark([vals[opt, m, s] for s in SEEDS], floor)
        if opt in record and v is None:
            return text + " (best)"
        return text + (f" {v.mark} {v.text()}" if v else "")

    table = ["| lr / sqrt rule | " + " | ".join(OPTIMIZERS) + " |", "|---|---|---|",
             *(f"| {m:g}x | " + " | ".join(cell_of(opt, m) for opt in OPTIMIZERS) + " |" for m in MULTIPLIERS)]
    return heads, table, record


def long_section(job: Job) -> tuple[list[str], dict]:
    metrics = read_metrics(job.run_dir)
    plan = (read_plan(job.run_dir) or [{}])[-1]
    parts = P.noise_scale_by_part([m for m in metrics if "loss" in m], parts=8)
    if not any(parts):
        return ["- The long run has no B_simple yet (not run, or still running)."], {}
    done = run_action(job.run_dir) == "skip"
    cells = " | ".join(L.noise_text(x) for x in parts)
    lines = [f"- LAMB at batch {LONG['batch']} for {LONG['epochs']:g} epochs ({plan.get('total_steps', '?')} steps"
             + ("" if done else ", NOT finished: the shares so far") + "): B_simple by eighth of the run (samples):",
             "", "| " + " | ".join(f"{i + 1}/8" for i in range(8)) + " |", "|" + "---|" * 8, f"| {cells} |", "",
             f"  Median over the eighths: {L.fmt(statistics.median(x for x in parts if x is not None), 3)} samples "
             f"(first half {L.fmt(statistics.median(x for x in parts[:4] if x is not None), 3)}, second half "
             f"{L.fmt(statistics.median(x for x in parts[4:] if x is not None), 3)}). The ladder's rungs are 2 ... 128 "
             f"over 1/3 epoch; a rung above these values is past the noise scale, where a larger batch no longer "
             f"cuts the steps a target needs. Final test loss {L.fmt(test_loss(job.run_dir))}."]
    return lines, {"b_simple_by_eighth": parts, "finished": done}


def tuned_section(jobs: dict, record: dict, floor: float | None = None) -> tuple[list[str], list[str]]:
    rows, heads = [], []
    for b in TUNED_BATCHES:
        per = {opt: [test_loss(j.run_dir) for (o, bb, s), j in jobs.items() if o == opt and bb == b
                     and not str(s).startswith("trial")] for opt in OPTIMIZERS}
        if not any(per.values()):
            continue
        chosen = {opt: record.get(opt, {}).get(str(b), {}) for opt in OPTIMIZERS}
        v = {opt: [x for x in per[opt] if x is not None] for opt in OPTIMIZERS}
        gap = P.gap_interval(v["lamb"], v["adamw"], False)  # positive: LAMB worse
        diff = f"{gap.gap:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}]" if gap and gap.lo is not None else "—"
        rows.append(f"| {b} | " + " | ".join(
            f"{cell(per[opt], len(SEEDS))}{floor_mark(per[opt], floor)} ({chosen[opt].get('chosen', '?')}"
            + (", AT THE EDGE" if chosen[opt].get("lr_at_edge") else "") + ")" for opt in OPTIMIZERS) + f" | {diff} |")
        if gap and gap.lo is not None:
            word = ("LAMB better" if gap.hi < 0 else "AdamW better" if gap.lo > 0 else "no difference resolved")
            marks = {opt: floor_mark(per[opt], floor) for opt in OPTIMIZERS}
            caveat = "; ".join(f"{opt}{m}" for opt, m in marks.items() if m)
            heads.append(f"- Tuned at batch {b}: {word} (LAMB - AdamW {gap.gap:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}] nats)"
                         + (f"; {caveat}: the comparison is with a model that barely trained" if caveat else "") + ".")
    table = ["| batch | LAMB tuned | AdamW tuned | LAMB - AdamW [95% Welch] |", "|---|---|---|---|", *rows]
    return heads, table


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=("lr", "long", "tuned"), action="append", help="default: all three")
    parser.add_argument("--tuned-batches", default=",".join(map(str, TUNED_BATCHES)))
    parser.add_argument("--work", default=str(REPO / "outputs" / "lamb_table1" / "studies"))
    parser.add_argument("--out", default=str(REPO / "results" / "lamb_studies"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", action="store_true", help="train nothing: render the runs finished so far")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    studies = args.study or ["lr", "long", "tuned"]
    work, results = Path(args.work), Path(args.out)
    lrs = base_lrs()
    runner = (ReportOnly if args.report else T1.Runner)(work, jobs=args.jobs, threads=args.threads,
                                                        checkpoint_every=0.125)
    ljobs, long = lr_jobs(work, lrs), long_job(work, lrs)
    tuned, tuned_record = {}, {}
    with runner, runner.stop_on_signals():
        if not args.report and "lr" in studies:
            runner.run_many(sorted(ljobs.values(), key=lambda j: str(j.run_dir)))
        if not args.report and "long" in studies:
            runner.run_many([long])
        for b in (int(x) for x in args.tuned_batches.split(",") if x):
            if args.report and not (work / "tuned" / "lamb" / f"batch={b}").exists():
                continue
            if "tuned" in studies or args.report:
                got, rec = T1.tune(runner, {**SCALE, "tuned": [b]}, lrs, COMMON, work / "tuned", list(SEEDS))
                tuned.update(got)
                for opt, r in rec.items():
                    tuned_record.setdefault(opt, {}).update(r)
    t0 = time.time()
    if results.exists():
        shutil.rmtree(results)
    folders = {j.run_dir: j.run_dir.relative_to(work) for j in [*ljobs.values(), long, *tuned.values()]
               if j.run_dir.exists()}
    copy_records(folders, results / "runs")
    from largebatch.report.unigram import unigram_baseline_from_run

    first = next((j.run_dir for j in ljobs.values() if run_action(j.run_dir) == "skip"), None)
    floor = (unigram_baseline_from_run(first).get("test") or {}) if first else {}
    lr_heads, lr_table, lr_record = lr_section(ljobs, floor.get("loss"))
    long_lines, long_record = long_section(long)
    tuned_heads, tuned_table = tuned_section(tuned, tuned_record, floor.get("loss"))
    run_s = sum(float((read_json(p) or {}).get("wall_time_s") or 0.0) for p in work.glob("**/summary.json"))
    text = "\n".join([
        "# LAMB Table 1: what this machine can test (BERT-tiny, the bundled corpus, seq 32, 38,912 samples a run)", "",
        "## What this shows", "", *lr_heads, *tuned_heads, "",
        f"Test loss (nats) on held-out documents; the unigram baseline there: {L.fmt(floor.get('loss'))} nats. "
        f"Base lrs from the committed sweep at batch 2: {lrs}. Training time of these runs: {run_s / 60:.1f} min, the "
        "sum of their wall times at one torch thread each (one or two runs at a time, on 2 cores shared with other "
        "work: more than a quiet machine needs).", "",
        f"## 1. lr robustness at batch {TOP}", "",
        f"Mean [95% t interval] over seeds {list(SEEDS)}; ✓/✗/? the interval verdict of each multiplier against "
        f"the optimizer's own best multiplier within {T1.MARGIN_NATS} nats.", "", *lr_table, "",
        "## 2. The noise scale over a long run", "", *long_lines, "",
        "## 3. The tuned oracle, head to head", "",
        "Each optimizer: halton:3 trials around the sqrt rule's lr and warmup at the batch (seed 0, selected on "
        f"validation loss), the best re-run on seeds {list(SEEDS)}; the test loss of the re-runs.", "", *tuned_table, ""])
    atomic_write_text(results / "table.md", text + "\n")
    atomic_write_json(results / "provenance.json", {
        "command": "python scripts/lamb_studies.py", "studies": studies, "base_lrs": lrs, "top": TOP,
        "multipliers": list(MULTIPLIERS), "seeds": list(SEEDS), "long": LONG, "tuned_batches": args.tuned_batches,
        "margin_nats": T1.MARGIN_NATS, "unigram_test": floor, "lr_robustness": lr_record, "long_run": long_record,
        "tuned": tuned_record, "run_seconds": round(run_s, 1), "threads_per_job": runner.threads,
        "jobs": runner.jobs, "work_folder": rel(work), "report_only": args.report, "rendered_in_s": round(time.time() - t0, 1), **environment()})
    print(text)
    return results


if __name__ == "__main__":
    try:
        main()
    except LargebatchError as error:
        fail(error)
