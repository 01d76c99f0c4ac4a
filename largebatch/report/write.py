"""Write a results folder: runs.csv, table.md, five plots and provenance.json.

Every number in it comes from a run folder, from the unigram baseline computed on the runs' data, or
from the paper's [checked] Table 1, which is printed in its own, labelled table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from largebatch.fileio import atomic_write_json, atomic_write_text
from largebatch.report import mlperf, paper, plots
from largebatch.report.runs import RUN_COLUMNS, STATUSES
from largebatch.report.summary import findings as compute_findings
from largebatch.report.summary import fmt, fmt_count, group_cells, loss_target, mark_targets, target_text
from largebatch.report.text import table, write_csv
from largebatch.runfolder import ENV, read_json

PLOTS = {"metric_vs_batch.png": "eval loss and downstream accuracy against batch size",
         "eval_loss_vs_samples.png": "eval loss against samples seen, per run",
         "lr_schedules.png": "learning rate used against samples seen, per run",
         "steps_to_target.png": "steps and samples to the target eval loss against batch size, with perfect scaling",
         "noise_scale.png": "gradient noise scale B_simple against samples seen, with the ladder's batch sizes"}


def write_report(rows: list[dict], out_dir: Path, *, unigram: dict | None = None, paper_table: bool = True,
                 title: str = "LAMB Table 1 at reduced scale", notes: str | None = None,
                 provenance: dict | None = None, candidate: str = "lamb", baseline: str = "adamw",
                 tolerance: float = 0.05, target_fraction: float = 0.5,
                 scaling_factor: float = 1.5) -> dict[str, Path]:
    """Write the report of ``rows`` (from :func:`collect_runs`) into ``out_dir``; returns the files written.
    Each file is written under a temporary name and renamed into place, so a reader never sees half of one.
    ``target_fraction`` and ``scaling_factor``: see :func:`largebatch.report.summary.findings`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = group_cells(rows)
    target = loss_target(cells, candidate, baseline, target_fraction)
    mark_targets(rows, target)  # before runs.csv: its steps_to_target / samples_to_target columns
    files = {"runs.csv": write_runs_csv(rows, out_dir / "runs.csv")}
    files["metric_vs_batch.png"] = plots.plot_metric_vs_batch(cells, out_dir / "metric_vs_batch.png", unigram)
    files["eval_loss_vs_samples.png"] = plots.plot_eval_loss_vs_samples(rows, out_dir / "eval_loss_vs_samples.png")
    files["lr_schedules.png"] = plots.plot_logged_lr(rows, out_dir / "lr_schedules.png")
    files["steps_to_target.png"] = plots.plot_steps_to_target(cells, out_dir / "steps_to_target.png", target)
    files["noise_scale.png"] = plots.plot_noise_scale(cells, out_dir / "noise_scale.png", (candidate, baseline))
    against_mlperf = mlperf.compare_runs(rows)  # None unless a run is (or looks like) an MLPerf workload
    if against_mlperf and against_mlperf.comparisons:
        files[mlperf.PLOT] = mlperf.plot(against_mlperf, out_dir / mlperf.PLOT)
    prov = gather_provenance(rows, {**(provenance or {}), **({"unigram": unigram} if unigram else {}),
                                    "tolerance": tolerance, "candidate": candidate, "baseline": baseline,
                                    "target_fraction": target_fraction, "scaling_factor": scaling_factor,
                                    "target": target,
                                    **({"mlperf_reference": against_mlperf.provenance()} if against_mlperf else {})})
    atomic_write_json(out_dir / "provenance.json", prov)
    files["provenance.json"] = out_dir / "provenance.json"
    bullets = compute_findings(rows, unigram=unigram, candidate=candidate, baseline=baseline, tolerance=tolerance,
                               target_fraction=target_fraction, scaling_factor=scaling_factor)
    text = render_table_md(rows, cells, bullets, unigram=unigram, paper_table=paper_table, title=title,
                           notes=notes, provenance=prov, target=target,
                           mlperf_lines=against_mlperf.markdown() if against_mlperf else None)
    atomic_write_text(out_dir / "table.md", text)
    files["table.md"] = out_dir / "table.md"
    return files


def write_runs_csv(rows: list[dict], path: Path) -> Path:
    return write_csv(rows, RUN_COLUMNS, path)


def _fixed(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def _lr(value) -> str:
    return value if isinstance(value, str) else fmt(value, 4)


def count_statuses(rows: list[dict]) -> str:
    """ "3 finished, 1 failed, 1 interrupted" (statuses in the order of runs.STATUSES, absent ones left out)."""
    words = {"ok": "finished"}
    counts = [(sum(r["status"] == s for r in rows), words.get(s, s)) for s in STATUSES]
    return ", ".join(f"{n} {word}" for n, word in counts if n) or "none"


def render_table_md(rows, cells, bullets, *, unigram, paper_table, title, notes, provenance, target=None,
                    mlperf_lines: list[str] | None = None) -> str:
    parts = [f"# {title}", "",
             f"Generated by `lb-report` from {len(rows)} run folder(s): {count_statuses(rows)}. Regenerate it "
             "(never edit by hand) with the command in `provenance.json`.", ""]
    if notes:
        parts += [notes.strip(), ""]
    parts += ["## Our runs, by optimizer and batch", "",
              "Eval: masked-LM loss (nats) and accuracy on the fixed held-out masks at the end of training. "
              "Downstream: fine-tuning accuracy starting from the pretrained model; random init: the same "
              "fine-tuning from a randomly initialised model. With several seeds a cell shows mean ± sample "
              "standard deviation. Mixed-batch rows are labelled batch@sequence-length per stage. Runs are "
              "averaged as seeds of one row only when their configs differ in the seed alone; only finished runs "
              "are counted (failed, interrupted and unfinished ones are listed under 'Every run').", ""]
    headers, body = _main_table(rows, cells, target)
    parts += ["\n".join(table(headers, body)) if body else "_No run finished._", ""]
    if "differs in" in headers:
        parts += ["'differs in': the config keys (seed aside) in which an optimizer's runs differ, beyond the "
                  "batch; each value is a separate row, never averaged with the others.", ""]
    if "B_noise" in headers:
        parts += ["B_noise: the gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, in samples), "
                  "as logged by the trainer, averaged over the log lines of the last half of each run and then over "
                  "seeds: roughly the batch beyond which a larger batch stops cutting the steps needed.", ""]
    if unigram is not None:
        parts += [*_unigram_lines(unigram, rows), ""]
    if target is not None:
        parts += ["## Steps and samples to a target loss", "", *_target_lines(target), ""]
    parts += mlperf_lines or []
    parts += ["## What this shows", "", *[f"- {b}" for b in bullets], ""]
    if paper_table:
        parts += [f"## The paper's numbers: {paper.TABLE1_LABEL}", "", paper.TABLE1_CAPTION, "",
                  "\n".join(table(paper.TABLE1_COLUMNS, paper.TABLE1_ROWS)), "",
                  "Other facts from the paper ([checked] from arXiv 1904.00962):", "",
                  *[f"- {f}" for f in paper.CHECKED_FACTS], ""]
    parts += ["## Every run", ""]
    run_headers = ["optimizer", "batch", "seed", "status", "steps", "eval loss", "eval acc", "downstream acc",
                   "wall time (s)", "note", "run folder"]
    run_body = [[r["optimizer"], r["batch_schedule"], r["seed"], r["status"], fmt(r.get("steps")),
                 _fixed(r.get("eval_loss")), _fixed(r.get("eval_accuracy")), _fixed(r.get("downstream_accuracy")),
                 fmt(r.get("wall_time_s"), 3), r.get("note") or "", f"`{r['run']}`"] for r in rows]
    if any(r.get("differs_in") for r in rows):
        run_headers[2:2] = ["differs in"]
        for line, r in zip(run_body, rows):
            line[2:2] = [r.get("differs_in") or "—"]
    parts += ["\n".join(table(run_headers, run_body)), ""]
    parts += ["## Plots", ""] + [f"- {desc}: ![{name}]({name})" for name, desc in PLOTS.items()] + [""]
    parts += ["## Provenance", "", *_provenance_lines(provenance), ""]
    return "\n".join(parts)


def _main_table(rows: list[dict], cells, target: dict | None) -> tuple[list[str], list[list]]:
    """The headers and rows of the cells' table; the steps/samples to target columns only when there is a target,
    B_noise only when a run logged the noise scale, F1 only for SQuAD fine-tuning, 'differs in' only when an
    optimizer's runs come in several configurations."""
    headers = ["optimizer", "batch", "seeds", "steps", "samples", "peak lr", "final train loss", "eval loss",
               "eval acc", "downstream acc", "random-init acc", "wall time (s)", "samples/s"]
    body = [[c.optimizer, c.batch_schedule, len(c.runs), c.distinct("steps"), c.distinct("samples"),
             ", ".join(sorted({_lr(r.get("peak_lr")) for r in c.runs})), c.fmt("final_loss"), c.fmt("eval_loss"),
             c.fmt("eval_accuracy"), c.fmt("downstream_accuracy"), c.fmt("random_init_accuracy"),
             c.fmt("wall_time_s", 3), c.fmt("samples_per_s", 3)] for c in cells]

    def insert(before: str, names: list[str], values) -> None:
        at = headers.index(before)
        headers[at:at] = names
        for line, c in zip(body, cells):
            line[at:at] = values(c)

    if target is not None:
        insert("downstream acc", ["steps to target", "samples to target"],
               lambda c: [target_text(c, "steps_to_target", target), target_text(c, "samples_to_target", target)])
    if any(c.values("b_noise") for c in cells):
        insert("downstream acc", ["B_noise"], lambda c: [_b_noise(c)])
    if any(r.get("downstream_f1") is not None for r in rows):  # SQuAD fine-tuning: F1 beside accuracy
        insert("wall time (s)", ["downstream F1", "random-init F1"],
               lambda c: [c.fmt("downstream_f1", 4), c.fmt("random_init_f1", 4)])
    if any(c.differs_in for c in cells):  # runs of one optimizer in several configurations: say which row is which
        insert("seeds", ["differs in"], lambda c: [c.differs_in or "—"])
    return headers, body


def _b_noise(cell) -> str:
    values = cell.values("b_noise")
    if not values:
        return "—"
    std = cell.std("b_noise")
    return fmt_count(cell.mean("b_noise")) + (f" ± {fmt_count(std)}" if std is not None else "")


def _unigram_lines(unigram: dict, rows: list[dict]) -> list[str]:
    """The unigram baseline, the number of masked tokens it was scored on, and whether that is the runs' own
    eval/tokens (the runs at its sequence length): a different count means different held-out tokens."""
    seq_len = unigram.get("seq_len")
    where = f" (sequence length {seq_len})" if seq_len else ""
    lines = [f"Unigram baseline{where}: predicting every masked token from training-set unigram frequency "
             f"(add-one smoothed): loss {unigram['loss']:.4f}, accuracy {unigram['accuracy']:.4f}."]
    tokens = unigram.get("eval_tokens")
    theirs = sorted({r["eval_tokens"] for r in rows if r["status"] == "ok" and r.get("eval_tokens") is not None
                     and (seq_len is None or r.get("seq_len") == seq_len)})
    if tokens is None:
        return lines
    if theirs == [tokens]:
        lines.append(f"It was scored on {tokens} masked tokens, the same number as every finished run's own eval "
                     f"(eval/tokens) at this sequence length: the same held-out sequences and masks.")
    elif theirs:
        lines.append(f"It was scored on {tokens} masked tokens, but the runs' own eval counted "
                     f"{', '.join(map(str, theirs))} (eval/tokens): the held-out tokens differ (another eval limit or "
                     "data, or runs made by code that masked differently), so compare with care.")
    else:
        lines.append(f"It was scored on {tokens} masked tokens; no finished run at this sequence length recorded "
                     "eval/tokens to check that against.")
    return lines


def _target_lines(target: dict) -> list[str]:
    """How the one target loss of the table was chosen, from which numbers, and how a run's steps to it are read."""
    sources = "; ".join(
        f"{name} batch {s['batch']}: {s['loss']:.4f} (mean of {s['seeds']} seed(s), at "
        f"{', '.join(fmt_count(x) for x in s['samples'])} samples)" for name, s in target["sources"].items())
    return [f"Target eval loss: **{target['loss']:.4f}** (nats), the eval loss of {target['from']}'s base rung. "
            f"How it was chosen: for each of the optimizers compared, its base rung (the smallest batch of its "
            f"single-stage ladder), its eval loss at the eval point closest to {fmt(target['fraction'])} of its "
            f"sample budget (ties: the earlier point), averaged over seeds ({sources}); the target is the larger (worse) of these, so every "
            "base rung reaches it.",
            "",
            "Steps (samples) to target (Shallue et al. 2018): the first point at which a run's eval loss is at or "
            "below the target, steps and samples linearly interpolated between the two eval points around the "
            "crossing; a run already below it at its first eval point gets that point (an upper bound). A cell "
            "averages the seeds that reached it and says 'k/n seeds reached it' when not all did; 'never': no "
            "seed did. Multi-stage runs count from their last stage's eval points only, and runs evaluated at "
            f"another sequence length than {target['seq_len']} have none (their held-out sequences differ). "
            "Perfect scaling: the steps halve when the batch doubles, so samples to target stay flat."]


def _provenance_lines(prov: dict) -> list[str]:
    lines = []
    if prov.get("report_command"):
        lines.append(f"- report command: `{prov['report_command']}`")
    shas = prov.get("git_shas") or []
    lines.append(f"- code version of the runs (git): {', '.join(f'`{s}`' for s in shas) or 'unknown'}; "
                 f"{prov.get('dirty_runs', 0)} run(s) had uncommitted changes")
    for group in prov.get("hardware", []):
        hw = group["hardware"] or {}
        lines.append(f"- hardware of {len(group['runs'])} run(s): device {group.get('device')}, "
                     f"{hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} cores)"
                     + (f", GPUs {', '.join(hw['cuda'])}" if hw.get("cuda") else ""))
    lines.append("- commands, library versions and per-run details: `provenance.json`")
    return lines


def _read_env(row: dict) -> dict:
    env = read_json(Path(row["_dir"]) / ENV) if row.get("_dir") else None
    return env if isinstance(env, dict) else {}


def _grouped(items: list[tuple[str, object]], name: str) -> list[dict]:
    """Identical values (versions, hardware) listed once with the runs that share them."""
    groups: dict[str, dict] = {}
    for run, value in items:
        key = json.dumps(value, sort_keys=True, default=str)
        groups.setdefault(key, {name: value, "runs": []})["runs"].append(run)
    return list(groups.values())


def gather_provenance(rows: list[dict], extra: dict | None = None) -> dict:
    envs = [(r, _read_env(r)) for r in rows]
    runs = [{"run": r["run"], "status": r["status"], "command": e.get("command"), "cwd": e.get("cwd"),
             "started": e.get("started"), "git": e.get("git"), "device": e.get("device"),
             "world_size": e.get("world_size")} for r, e in envs]
    hardware = _grouped([(r["run"], e.get("hardware")) for r, e in envs if e], "hardware")
    for group in hardware:
        group["device"] = next(e.get("device") for r, e in envs if r["run"] == group["runs"][0])
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_shas": sorted({(e.get("git") or {}).get("sha") for _, e in envs if (e.get("git") or {}).get("sha")}),
        "dirty_runs": sum(bool((e.get("git") or {}).get("dirty")) for _, e in envs),
        "versions": _grouped([(r["run"], e.get("versions")) for r, e in envs if e], "versions"),
        "hardware": hardware,
        "runs": runs,
        **(extra or {}),
    }
