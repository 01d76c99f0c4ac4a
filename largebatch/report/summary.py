"""Group finished runs into cells and say in words what the numbers show.

A cell is the finished runs whose resolved configs differ by the seed alone (bookkeeping keys such as
``progress`` or ``logger`` aside, see ``runs.BOOKKEEPING_KEYS``); they are averaged as seeds. Runs that
differ in anything else (a learning rate, the data) are separate cells, each labelled with the keys in
which it differs (``differs_in``). An optimizer's batch ladder is made of its single-stage cells that
differ only in the batch; when an optimizer has cells in several such configurations, the findings use
the one with the most batch sizes and say so.

Every sentence of :func:`findings` is computed from the rows; when the rows cannot support a claim
(missing rungs, one seed) the sentence says that instead of assuming the paper's result.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from largebatch.report.runs import AXIS_KEYS, key_matches, optimizer_rank, result_config

MAX_LISTED = 10  # failed runs named in the prose; the 'Every run' table lists all of them

# Losses (nats) and accuracies sit in [0, ~10]: four decimals keep columns aligned and comparable.
FIXED_DECIMALS = {"final_loss", "eval_loss", "eval_accuracy", "downstream_accuracy", "random_init_accuracy"}


@dataclass
class Cell:
    optimizer: str
    batch: int | None  # the (last) stage's global batch
    batch_schedule: str  # label: "256", or "512@32/256@64" for a multi-stage run
    seq_len: int | None
    stages: int
    runs: list[dict]
    differs_in: str = ""  # "optimizer.lr=0.002, ...": what sets this cell apart from others of its optimizer

    @property
    def config(self) -> dict:
        """The config its runs share (seed and bookkeeping keys aside)."""
        return result_config(self.runs[0])

    @property
    def variant(self) -> tuple:
        """The config less the ladder's axis (batch, stages): equal for the rungs of one ladder."""
        return tuple(sorted((k, repr(v)) for k, v in self.config.items() if not key_matches(k, AXIS_KEYS)))

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs if isinstance(r.get(key), (int, float))]

    def mean(self, key: str) -> float | None:
        v = self.values(key)
        return statistics.fmean(v) if v else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds; None with fewer than two values."""
        v = self.values(key)
        return statistics.stdev(v) if len(v) >= 2 else None

    def fmt(self, key: str, digits: int = 4) -> str:
        mean, std = self.mean(key), self.std(key)
        if mean is None:
            return "—"
        shown = f"{mean:.4f}" if key in FIXED_DECIMALS else fmt(mean, digits)
        return f"{shown} ± {fmt(std, 2)}" if std is not None else shown

    def distinct(self, key: str) -> str:
        """One value when all seeds agree (steps, samples, lr), else the distinct values."""
        vals = sorted({str(r.get(key)) for r in self.runs if r.get(key) is not None})
        return ", ".join(vals) if vals else "—"


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return str(int(x))
    return f"{x:.{digits}g}"


def group_cells(rows: list[dict]) -> list[Cell]:
    """Finished runs only, one cell per config (seed and bookkeeping keys aside); seeds of a cell are averaged.
    Failed, interrupted and unfinished runs are never pooled."""
    cells: dict[tuple, Cell] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["optimizer"], r["batch_schedule"], repr(sorted(result_config(r).items(), key=lambda kv: kv[0])))
        if key not in cells:
            cells[key] = Cell(r["optimizer"], r["batch"], r["batch_schedule"], r["seq_len"], r["stages"], [],
                              r.get("differs_in") or "")
        cells[key].runs.append(r)
    return sorted(cells.values(), key=lambda c: (optimizer_rank(c.optimizer), c.stages > 1, c.batch or 0,
                                                 c.batch_schedule, c.differs_in))


def variants(cells: list[Cell], optimizer: str) -> list[list[Cell]]:
    """The single-stage cells of one optimizer with an eval loss, by configuration (batch aside), the
    configuration with the most batch sizes first; each smallest batch first."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.optimizer == optimizer and c.stages == 1 and c.mean("eval_loss") is not None:
            groups.setdefault(c.variant, []).append(c)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0].differs_in))


def ladder(cells: list[Cell], optimizer: str) -> list[Cell]:
    """The single-stage rungs of one optimizer with an eval loss, smallest batch first; of one configuration
    only (the one with the most batch sizes), so a rung is never compared with a differently tuned one."""
    found = variants(cells, optimizer)
    return found[0] if found else []


def _rung_change(cells: list[Cell], optimizer: str, tolerance: float) -> dict | None:
    rungs = ladder(cells, optimizer)
    if len(rungs) < 2:
        return None
    base, top = rungs[0], rungs[-1]
    delta = top.mean("eval_loss") - base.mean("eval_loss")
    spreads = [s for s in (base.std("eval_loss"), top.std("eval_loss")) if s is not None]
    return {"base": base, "top": top, "delta": delta, "holds": delta <= tolerance,
            "noise": max(spreads) if len(spreads) == 2 else None}


def _describe_change(name: str, ch: dict, tolerance: float) -> str:
    base, top, delta = ch["base"], ch["top"], ch["delta"]
    ratio = f"{top.batch / base.batch:g}" if base.batch and top.batch else None
    verdict = (f"within the {fmt(tolerance)} tolerance" if abs(delta) <= tolerance
               else "better than at the base rung" if delta < 0 else f"worse by more than the {fmt(tolerance)} tolerance")
    text = (f"{name}: eval loss {base.fmt('eval_loss')} at batch {base.batch_schedule} → {top.fmt('eval_loss')} at "
            f"batch {top.batch_schedule}{f' ({ratio}x larger)' if ratio else ''}: change {delta:+.4g}, {verdict}.")
    if ch["noise"] is not None:
        text += (f" The change is {'smaller' if abs(delta) < ch['noise'] else 'larger'} than the seed-to-seed "
                 f"spread ({fmt(ch['noise'], 2)}).")
    return text


def findings(rows: list[dict], *, unigram: dict | None = None, candidate: str = "lamb", baseline: str = "adamw",
             tolerance: float = 0.05) -> list[str]:
    """Plain-language bullets, each computed from ``rows``. ``tolerance``: the largest rise of the
    eval loss (nats) from the base to the top rung still called "holding" (a choice, not a result)."""
    cells = group_cells(rows)
    done = [r for r in rows if r["status"] == "ok"]
    out: list[str] = []
    if not done:
        return ["No run finished, so these results show nothing yet."]

    budgets = sorted({r["samples"] for r in done if r.get("samples") is not None})
    if len(budgets) == 1:
        out.append(f"Every finished run saw the same number of training samples ({budgets[0]}), so the rungs "
                   "differ only in how the samples are grouped into optimizer steps.")
    elif budgets:
        out.append(f"The finished runs did NOT all see the same number of samples ({budgets[0]} to {budgets[-1]}): "
                   "comparisons across batch sizes are not like-for-like.")

    changes = {name: _rung_change(cells, name, tolerance) for name in (candidate, baseline)}
    for name, ch in changes.items():
        if ch is not None:
            out.append(_describe_change(name, ch, tolerance))
    cand, base = changes[candidate], changes[baseline]
    if cand is None or base is None:
        missing = [n for n, ch in changes.items() if ch is None]
        out.append("Cannot judge the paper's claim: no finished runs at two or more batch sizes for "
                   f"{' and '.join(missing)}.")
    elif cand["holds"] and not base["holds"]:
        out.append(f"This shows the paper's effect at this scale: {candidate} keeps its eval loss from the base to "
                   f"the top rung while {baseline}'s rises by {base['delta']:.4g}.")
    elif cand["holds"] and base["holds"]:
        out.append(f"This does NOT show the paper's effect: {baseline} also stays within the tolerance, so this "
                   f"batch ladder does not separate {candidate} from {baseline}.")
    elif base["holds"]:
        out.append(f"This does NOT show the paper's effect; it shows the opposite: {candidate}'s eval loss rises by "
                   f"{cand['delta']:.4g} from the base to the top rung while {baseline}'s stays within the tolerance.")
    else:
        less = candidate if cand["delta"] < base["delta"] else baseline
        out.append(f"This does NOT show the paper's effect: both degrade at the top rung ({candidate} "
                   f"{cand['delta']:+.4g}, {baseline} {base['delta']:+.4g}); {less} degrades less.")
    if any(ch is not None and ch["noise"] is not None and abs(ch["delta"]) < ch["noise"] for ch in changes.values()):
        out.append("At least one of these changes is smaller than its seed-to-seed spread, so the verdict above "
                   "is not a reliable difference.")
    if any(ch is not None and ch["noise"] is None for ch in changes.values()):
        out.append("At least one of these cells has a single seed: a difference of this size may be seed noise; "
                   "run more seeds before drawing a conclusion.")

    out += _configurations(cells, candidate, baseline)
    out += _head_to_head(cells, candidate)
    out += _mixed_batch(cells)
    out += _downstream(cells, done, candidate)
    out += _throughput(cells, candidate)
    if unigram is not None:
        out += _versus_unigram(done, unigram)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        shown = failed[:MAX_LISTED]
        more = f"; and {len(failed) - len(shown)} more (see 'Every run')" if len(failed) > len(shown) else ""
        out.append(f"{len(failed)} run(s) did not finish and are left out of everything above: "
                   + "; ".join(f"{r['optimizer']} batch {r['batch_schedule']} seed {r['seed']} in "
                               f"{Path(r['run']).name} ({r['note']})" for r in shown) + more)
    return out


def _differing_keys(configs: list[dict]) -> list[str]:
    keys = set().union(*configs) if configs else set()
    return sorted(k for k in keys if len({repr(c.get(k)) for c in configs}) > 1)


def _configurations(cells: list[Cell], candidate: str, baseline: str) -> list[str]:
    """Say when an optimizer's runs come in several configurations (only one makes its ladder), and when the
    candidate's and the baseline's ladders differ in more than the optimizer."""
    out = []
    for name in sorted({c.optimizer for c in cells}, key=optimizer_rank):
        found = variants(cells, name)
        if len(found) > 1:
            keys = _differing_keys([dict(v[0].variant) for v in found])
            out.append(f"{name} has finished single-stage runs in {len(found)} configurations that differ in "
                       f"{', '.join(keys)}; they are separate rows of the table, never averaged, and its batch "
                       f"ladder above uses the one with the most batch sizes ({found[0][0].differs_in or '—'}).")
    ladders = [ladder(cells, candidate), ladder(cells, baseline)]
    if all(ladders):
        # The optimizer's own options differ by design; scaling.ref_lr is the optimizer's lr.
        keys = [k for k in _differing_keys([dict(rungs[0].variant) for rungs in ladders])
                if not k.startswith("optimizer.") and k != "scaling.ref_lr"]
        if keys:
            out.append(f"The {candidate} and {baseline} ladders also differ in {', '.join(keys)}: the comparison "
                       "between them is not like-for-like.")
    return out


def _head_to_head(cells: list[Cell], candidate: str) -> list[str]:
    """Candidate against every other optimizer at the batch sizes both ran (the paper: LAMB beats LARS)."""
    candidate_cells = {c.batch_schedule: c for c in ladder(cells, candidate)}
    out = []
    for other in sorted({c.optimizer for c in cells} - {candidate}, key=optimizer_rank):
        theirs = {c.batch_schedule: c for c in ladder(cells, other)}
        shared = [b for b in candidate_cells if b in theirs]
        if not shared:
            continue
        wins = [b for b in shared if candidate_cells[b].mean("eval_loss") < theirs[b].mean("eval_loss")]
        ties = [b for b in shared if candidate_cells[b].mean("eval_loss") == theirs[b].mean("eval_loss")]
        top = shared[-1]
        out.append(f"{candidate} has a lower eval loss than {other} at {len(wins)} of {len(shared)} shared batch "
                   f"size(s) ({', '.join(shared)}){f', an equal one at {len(ties)}' if ties else ''}; at batch "
                   f"{top}: {candidate_cells[top].fmt('eval_loss')} vs {theirs[top].fmt('eval_loss')}.")
    return out


def _mixed_batch(cells: list[Cell]) -> list[str]:
    out = []
    for mixed in (c for c in cells if c.stages > 1 and c.mean("eval_loss") is not None):
        rungs = ladder(cells, mixed.optimizer)
        if not rungs:
            continue
        top = rungs[-1]
        text = (f"Mixed batch {mixed.batch_schedule} ({mixed.optimizer}): eval loss {mixed.fmt('eval_loss')} vs "
                f"{top.fmt('eval_loss')} at single-stage batch {top.batch_schedule}; wall time "
                f"{mixed.fmt('wall_time_s')} s "
                f"vs {top.fmt('wall_time_s')} s.")
        if mixed.seq_len != top.seq_len:
            text += (f" Its last stage is evaluated at sequence length {mixed.seq_len}, the single-stage runs at "
                     f"{top.seq_len}: the eval sets differ, so the losses are not directly comparable.")
        out.append(text)
    return out


def _downstream(cells: list[Cell], done: list[dict], candidate: str) -> list[str]:
    metric = "accuracy" if any(r.get("downstream_accuracy") is not None for r in done) else "f1"
    key, random_key = f"downstream_{metric}", f"random_init_{metric}"
    scored = [r for r in done if r.get(key) is not None]
    if not scored:
        return ["No run has a downstream (fine-tuning) score, so nothing is said about downstream accuracy."]
    out = []
    rungs = [c for c in ladder(cells, candidate) if c.mean(key) is not None]
    if len(rungs) >= 2:
        out.append(f"Downstream {metric} ({candidate}): {rungs[0].fmt(key)} at batch "
                   f"{rungs[0].batch_schedule} → {rungs[-1].fmt(key)} at batch {rungs[-1].batch_schedule}.")
    paired = [r for r in scored if r.get(random_key) is not None]
    if paired:
        better = sum(r[key] > r[random_key] for r in paired)
        out.append(f"Pretraining helps downstream in {better} of {len(paired)} run(s) scored both ways "
                   f"(pretrained vs random-init fine-tuning {metric})"
                   + ("." if better == len(paired) else "; where it does not, the pretraining taught little."))
    return out


def _throughput(cells: list[Cell], candidate: str) -> list[str]:
    rungs = [c for c in ladder(cells, candidate) if c.mean("samples_per_s")]
    if len(rungs) < 2:
        return []
    base, top = rungs[0], rungs[-1]
    return [f"Throughput ({candidate}): {fmt(top.mean('samples_per_s'))} samples/s at batch {top.batch_schedule} vs "
            f"{fmt(base.mean('samples_per_s'))} at batch {base.batch_schedule} "
            f"({top.mean('samples_per_s') / base.mean('samples_per_s'):.3g}x); wall time {top.fmt('wall_time_s')} s "
            f"vs {base.fmt('wall_time_s')} s."]


def _versus_unigram(done: list[dict], unigram: dict) -> list[str]:
    seq_len = unigram.get("seq_len")
    comparable = [r for r in done if r.get("eval_loss") is not None and (seq_len is None or r["seq_len"] == seq_len)]
    if not comparable:
        return []
    worse = [r for r in comparable if r["eval_loss"] >= unigram["loss"]]
    text = (f"{len(comparable) - len(worse)} of {len(comparable)} finished run(s) beat the unigram baseline's eval "
            f"loss ({unigram['loss']:.4f}).")
    if worse:
        text += (" Not beating it means a model has learned no more than token frequencies, so its place on the "
                 "ladder says little: " + ", ".join(f"{r['optimizer']} batch {r['batch_schedule']} seed {r['seed']}"
                                                   for r in worse) + ".")
    return [text]
