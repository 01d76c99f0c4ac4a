"""Group finished runs into cells and say in words what the numbers show.

A cell is the finished runs whose resolved configs differ by the seed alone (bookkeeping keys such as
``progress`` or ``logger`` aside, see ``runs.BOOKKEEPING_KEYS``); they are averaged as seeds. Runs that
differ in anything else (a learning rate, the data) are separate cells, each labelled with the keys in
which it differs (``differs_in``). An optimizer's batch ladder is made of its single-stage cells that
differ only in the batch; when an optimizer has cells in several such configurations, the findings use
the one with the most batch sizes and say so.

Every sentence of :func:`findings` is computed from the rows; when the rows cannot support a claim
(missing rungs, one seed) the sentence says that instead of assuming the paper's result.

Besides the end-of-training losses, the findings measure how the ladder scales:

- steps and samples to a target loss (Shallue et al. 2018, "Measuring the Effects of Data Parallelism"): one
  target for the whole table (:func:`loss_target`), reached by every run at an interpolated step
  (:func:`mark_targets`), compared with perfect scaling (steps halve when the batch doubles);
- the gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"),
  the batch beyond which larger batches stop paying off, logged by the trainer as "noise/b_simple";
- interval verdicts (largebatch/protocol.py, docs/protocol.md): a rung holds, fails or is unresolved by the
  95% interval of its own gap to its base rung against the margin (:func:`hold_up_to`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from largebatch import protocol as P
from largebatch.report.runs import AXIS_KEYS, key_matches, optimizer_rank, result_config, to_target
from largebatch.report.text import fmt

MAX_LISTED = 10  # failed runs named in the prose; the 'Every run' table lists all of them

# Losses (nats) and accuracies sit in [0, ~10]: four decimals keep columns aligned and comparable.
FIXED_DECIMALS = {"final_loss", "eval_loss", "eval_accuracy", "downstream_accuracy", "random_init_accuracy"}


@dataclass
class SeedGroup:
    """The runs of one configuration at one batch that differ only in the seed: a row of lb-report's table, with
    mean and sample std per metric. (The protocol's cell, with its interval and verdict, is ``ladder.Cell``.)"""

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


def fmt_count(x) -> str:
    """Steps, samples and batch-like numbers: whole numbers from 100 up, three significant digits below."""
    if x is None:
        return "—"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def group_cells(rows: list[dict]) -> list[SeedGroup]:
    """Finished runs only, one cell per config (seed and bookkeeping keys aside); seeds of a cell are averaged.
    Failed, interrupted and unfinished runs are never pooled."""
    cells: dict[tuple, SeedGroup] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["optimizer"], r["batch_schedule"], repr(sorted(result_config(r).items(), key=lambda kv: kv[0])))
        if key not in cells:
            cells[key] = SeedGroup(r["optimizer"], r["batch"], r["batch_schedule"], r["seq_len"], r["stages"], [],
                              r.get("differs_in") or "")
        cells[key].runs.append(r)
    return sorted(cells.values(), key=lambda c: (optimizer_rank(c.optimizer), c.stages > 1, c.batch or 0,
                                                 c.batch_schedule, c.differs_in))


def variants(cells: list[SeedGroup], optimizer: str) -> list[list[SeedGroup]]:
    """The single-stage cells of one optimizer with an eval loss, by configuration (batch aside), the
    configuration with the most batch sizes first; each smallest batch first."""
    groups: dict[tuple, list[SeedGroup]] = {}
    for c in cells:
        if c.optimizer == optimizer and c.stages == 1 and c.mean("eval_loss") is not None:
            groups.setdefault(c.variant, []).append(c)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0].differs_in))


def ladder(cells: list[SeedGroup], optimizer: str) -> list[SeedGroup]:
    """The single-stage rungs of one optimizer with an eval loss, smallest batch first; of one configuration
    only (the one with the most batch sizes), so a rung is never compared with a differently tuned one."""
    found = variants(cells, optimizer)
    return found[0] if found else []


def _rung_change(cells: list[SeedGroup], optimizer: str, tolerance: float, key: str = "eval_loss") -> dict | None:
    """Base to top rung of one optimizer's ladder: the change of ``key`` and the protocol's interval verdict."""
    rungs = ladder(cells, optimizer)
    if len(rungs) < 2:
        return None
    base, top = rungs[0], rungs[-1]
    verdict = P.verdict(top.values(key), base.values(key), tolerance, higher_is_better=False)
    return {"base": base, "top": top, "delta": top.mean(key) - base.mean(key), "verdict": verdict, "key": key}


def _describe_change(name: str, ch: dict, tolerance: float) -> str:
    base, top, delta, key = ch["base"], ch["top"], ch["delta"], ch["key"]
    label = key.replace("_", " ")
    ratio = f"{top.batch / base.batch:g}" if base.batch and top.batch else None
    g = ch["verdict"].gap
    interval = f" (95% interval of the change [{g.lo:+.3g}, {g.hi:+.3g}])" if g is not None else ""
    word = {"holds": f"holds within the {fmt(tolerance)} margin", "fails": f"fails: worse by more than {fmt(tolerance)}",
            "unresolved": ch["verdict"].text(), "missing": "no finished seed"}[ch["verdict"].word]
    return (f"{name}: {label} {base.fmt(key)} at batch {base.batch_schedule} → {top.fmt(key)} at batch "
            f"{top.batch_schedule}{f' ({ratio}x larger)' if ratio else ''}: change {delta:+.4g}{interval}: {word}.")


def findings(rows: list[dict], *, unigram: dict | None = None, candidate: str = "lamb", baseline: str = "adamw",
             tolerance: float = 0.05, target_fraction: float = 0.5, scaling_factor: float = 1.5) -> list[str]:
    """Plain-language bullets, each computed from ``rows``. ``tolerance``: the largest rise of the
    loss (nats) from the base rung still called "holding" (the verdicts' margin, a choice, not a result).
    ``target_fraction``: where on the base rungs' runs the target
    loss is read (see :func:`loss_target`); ``scaling_factor``: how far above perfect scaling the steps to
    target may be and still count as scaling. Sets the rows' steps and samples to target (see
    :func:`mark_targets`)."""
    cells = group_cells(rows)
    target = loss_target(cells, candidate, baseline, target_fraction)
    mark_targets(rows, target)
    done = [r for r in rows if r["status"] == "ok"]
    out: list[str] = []
    if not done:
        return ["No run finished, so these results show nothing yet."]

    ladder_runs = [r for r in done if (r.get("stages") or 1) == 1]  # a mixed-batch run is compared apart
    budgets = sorted({r["samples"] for r in ladder_runs if r.get("samples") is not None})
    if len(budgets) == 1:
        out.append(f"Every finished ladder run saw the same number of training samples ({budgets[0]}), so the "
                   "rungs differ only in how the samples are grouped into optimizer steps.")
    elif budgets:
        out.append(f"The finished ladder runs did NOT all see the same number of samples ({budgets[0]} to "
                   f"{budgets[-1]}): comparisons across batch sizes are not like-for-like.")

    key = "test_loss" if any(r.get("test_loss") is not None for r in done) else "eval_loss"
    if key == "test_loss":
        out.append("Verdicts read the test loss (held-out documents apart from the validation ones that select the "
                   "learning rates and that the evaluation points and steps to target read).")
    changes = {name: _rung_change(cells, name, tolerance, key) for name in (candidate, baseline)}
    for name, ch in changes.items():
        if ch is not None:
            out.append(_describe_change(name, ch, tolerance))
    missing = [n for n, ch in changes.items() if ch is None]
    if missing:
        out.append(f"Cannot judge the paper's claim: no finished runs at two or more batch sizes for {' and '.join(missing)}.")
    out += _single_seeds([c for name in (candidate, baseline) for c in ladder(cells, name)], candidate, baseline)
    holds = {name: hold_up_to(cells, name, tolerance, key) for name in (candidate, baseline)}
    out += [_describe_hold(name, h, tolerance) for name, h in holds.items() if h is not None]
    out += _gaps_against_spread(cells, candidate, baseline, key)
    out += _steps_to_target(cells, (candidate, baseline), target, scaling_factor)
    out += _noise_scale(cells, (candidate, baseline), holds)
    untrained, barely = _against_unigram(cells, unigram, key, tolerance)
    verdict = _verdict(holds, candidate, baseline, untrained, barely)  # the headline: first, its evidence after

    out += _configurations(cells, candidate, baseline)
    out += _head_to_head(cells, candidate, key, untrained, barely)
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
    return [verdict, *out]


# --- interval verdicts (largebatch/protocol.py): no verdict borrows spread from another rung


def hold_up_to(cells: list[SeedGroup], optimizer: str, tolerance: float, key: str = "eval_loss") -> dict | None:
    """How far up its ladder an optimizer holds its base rung's loss, by the protocol's interval verdicts
    (``tolerance``: the margin, nats): ``last`` the largest batch up to which every rung holds, ``possible`` the
    largest up to which none fails (between them: unresolved), ``first_off`` the first rung that does not hold.
    None without two rungs."""
    rungs = ladder(cells, optimizer)
    if len(rungs) < 2:
        return None
    base = rungs[0]
    verdicts = [(c, P.verdict(c.values(key), base.values(key), tolerance, higher_is_better=False)) for c in rungs[1:]]
    proven, possible = P.reach([(c.batch, v) for c, v in verdicts], base.batch)
    by_batch = {c.batch: c for c in rungs}
    first_off = next(((c, v) for c, v in verdicts if v.word != "holds"), None)
    return {"base": base, "last": by_batch[proven], "possible": by_batch[possible], "top": rungs[-1],
            "first_off": first_off, "verdicts": verdicts}


def _describe_hold(name: str, h: dict, tolerance: float) -> str:
    base, last = h["base"], h["last"]
    head = f"{name} holds its base rung's loss (batch {base.batch_schedule}, margin {fmt(tolerance)} nats, 95% intervals) "
    if h["first_off"] is None:
        return head + f"at every rung, to batch {last.batch_schedule}, the top of its ladder."
    text = head + (f"up to batch {last.batch_schedule}" if last is not base else "at no rung above the base")
    parts = []
    for c, v in h["verdicts"]:
        if v.word == "holds":
            continue
        g = v.gap
        gap = f" (gap {g.gap:+.3g} [{g.lo:+.3g}, {g.hi:+.3g}])" if g is not None else ""
        parts.append(f"batch {c.batch_schedule} {v.text()}{gap}")
    return text + "; " + "; ".join(parts) + "."


def _single_seeds(rungs: list[SeedGroup], candidate: str, baseline: str) -> list[str]:
    """The caveat for the ladder cells with a single seed (and only for them): their gaps have no spread."""
    single = [c for c in rungs if len(c.values("eval_loss")) < 2]
    if not single:
        return []
    if len(single) == len(rungs):
        which = f"Every cell of the {candidate} and {baseline} ladders has a single seed"
    else:
        shown = ", ".join(f"{c.optimizer} batch {c.batch_schedule}" for c in single[:MAX_LISTED])
        which = (f"{'This cell has' if len(single) == 1 else 'These cells have'} a single seed ({shown}"
                 f"{', ...' if len(single) > MAX_LISTED else ''})")
    return [f"{which}: a difference of this size may be seed noise; run more seeds before drawing a conclusion."]


def _gaps_against_spread(cells: list[SeedGroup], candidate: str, baseline: str, key: str = "eval_loss") -> list[str]:
    """Candidate against baseline at every shared batch: a gap is beyond the seed spread only when it is larger
    than both cells' sample standard deviations."""
    mine = {c.batch_schedule: c for c in ladder(cells, candidate)}
    theirs = {c.batch_schedule: c for c in ladder(cells, baseline)}
    shared = [b for b in mine if b in theirs]
    if not shared or not any(mine[b].std(key) is not None or theirs[b].std(key) is not None
                             for b in shared):
        return []  # single seeds only: the caveat above says so
    clauses = []
    for b in shared:
        gap = theirs[b].mean(key) - mine[b].mean(key)  # > 0: the candidate is better
        spreads = (mine[b].std(key), theirs[b].std(key))
        if None in spreads:
            against = "a single seed on one side, so no spread to compare"
        else:
            shown = f"({fmt(spreads[0], 2)}, {fmt(spreads[1], 2)})"
            against = (f"beyond the seed spread {shown}" if abs(gap) > max(spreads)
                       else f"within the seed spread {shown}")
        if gap == 0:
            clauses.append(f"{candidate} and {baseline} are equal at batch {b}")
            continue
        better, worse = (candidate, baseline) if gap > 0 else (baseline, candidate)
        clauses.append(f"{better} is better than {worse} by {abs(gap):.3g} at batch {b}, {against}")
    return [f"{candidate} vs {baseline} at each shared batch (seed spread: the sample std of each cell): "
            + "; ".join(clauses) + "."]


def _against_unigram(cells: list[SeedGroup], unigram: dict | None, key: str, tolerance: float
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Each optimizer's base rung against the unigram baseline (on the split ``key`` reads): ({optimizer: its
    mean loss} where it does not beat the unigram: it learned no more than token frequencies, so no verdict
    compares it; {optimizer: how far below the unigram} where that is under two margins: it barely trained)."""
    if unigram is None:
        return {}, {}
    floor = unigram["test"]["loss"] if key == "test_loss" and "test" in unigram else unigram["loss"]
    untrained, barely = {}, {}
    for name in {c.optimizer for c in cells}:
        rungs = ladder(cells, name)
        if not rungs or rungs[0].mean(key) is None:
            continue
        if not P.beats_baseline(rungs[0].values(key), floor, higher_is_better=False):
            untrained[name] = rungs[0].mean(key)
        elif floor - rungs[0].mean(key) < 2 * tolerance:
            barely[name] = floor - rungs[0].mean(key)
    return untrained, barely


def _verdict(holds: dict, candidate: str, baseline: str, untrained: dict | None = None,
             barely: dict | None = None) -> str:
    """The question the ladder asks: does the candidate hold its loss further up than the baseline? Yes only
    when its proven reach passes the baseline's possible one; no when the baseline provably holds as far as
    the candidate possibly does; otherwise unresolved. Never a verdict on a row that did not train, and no
    "yes" for one that barely trained (a flat ladder of a barely-trained model reads as scaling)."""
    cand, base = holds[candidate], holds[baseline]
    if cand is None or base is None:
        missing = " and ".join(n for n, h in holds.items() if h is None)
        return (f"Verdict: cannot say whether {candidate} holds its loss further up the ladder than {baseline}: "
                f"no two rungs for {missing}.")
    dropped = [n for n in (candidate, baseline) if n in (untrained or {})]
    if dropped:
        return (f"Verdict: none: {' and '.join(dropped)} did not beat the unigram baseline at the base rung, so "
                "the ladder compares models that did not train.")
    c_proven, c_possible = cand["last"].batch, cand["possible"].batch
    b_proven, b_possible = base["last"].batch, base["possible"].batch
    if c_proven > b_possible and candidate in (barely or {}):
        return (f"Verdict: none: {candidate} holds further up than {baseline}, but its base rung is only "
                f"{barely[candidate]:.3g} nats below the unigram baseline: a model that barely trained keeps a flat "
                "loss at any batch, which is not scaling. Train the base rung longer.")
    if c_proven > b_possible:
        return (f"Verdict: yes, {candidate} holds its loss further up the ladder than {baseline}: it holds up to "
                f"batch {c_proven}, where {baseline} has failed by batch {b_possible}'s next rung.")
    if c_possible <= b_proven:
        return (f"Verdict: no, {candidate} does not hold its loss further up the ladder than {baseline}: "
                f"{baseline} holds up to batch {b_proven}, {candidate} at most up to {c_possible}.")
    return (f"Verdict: unresolved: {candidate} holds up to batch {c_proven} (possibly {c_possible}), {baseline} up "
            f"to {b_proven} (possibly {b_possible}); the unresolved rungs say how many seeds would settle it.")


# --- steps and samples to a target loss (Shallue et al. 2018)


def _point_near(points: list[dict], samples: float) -> dict | None:
    """The eval point closest to ``samples`` (ties: the earlier one, min keeps the first)."""
    return min(points, key=lambda p: abs(p["samples"] - samples)) if points else None


def loss_target(cells: list[SeedGroup], candidate: str = "lamb", baseline: str = "adamw",
                fraction: float = 0.5) -> dict | None:
    """One target eval loss for the whole table. For the candidate and the baseline: the base rung of its
    ladder (smallest batch), its eval loss at the eval point closest to ``fraction`` of each run's sample
    budget, averaged over seeds; the target is the larger (worse) of the two, so both base rungs reach it.
    {"loss", "fraction", "from" (the optimizer it came from), "seq_len", "sources": {optimizer: {"batch",
    "loss", "samples" (the eval points used), "seeds"}}}; None when neither has eval points."""
    sources = {}
    for name in (candidate, baseline):
        rungs = ladder(cells, name)
        if not rungs:
            continue
        base = rungs[0]
        picked = [_point_near(r.get("_eval") or [], fraction * r["samples"]) for r in base.runs if r.get("samples")]
        picked = [p for p in picked if p is not None]
        if picked:
            sources[name] = {"batch": base.batch_schedule, "loss": statistics.fmean(p["loss"] for p in picked),
                             "samples": sorted({p["samples"] for p in picked}), "seeds": len(picked),
                             "seq_len": base.seq_len}
    if not sources:
        return None
    chosen = max(sources, key=lambda n: sources[n]["loss"])
    return {"loss": sources[chosen]["loss"], "fraction": fraction, "from": chosen,
            "seq_len": sources[chosen]["seq_len"], "sources": sources}


def mark_targets(rows: list[dict], target: dict | None) -> None:
    """Set every finished run's ``steps_to_target`` and ``samples_to_target`` (None: never reached, or no
    target, or evaluated at another sequence length than the target's, so on other held-out sequences).
    ``_target_at_first_eval`` flags a run already at the target by its first eval point (an upper bound)."""
    for r in rows:
        hit = None
        if target is not None and r["status"] == "ok" and r.get("seq_len") == target["seq_len"]:
            hit = to_target(r.get("_eval") or [], target["loss"])
        r["steps_to_target"] = hit["steps"] if hit else None
        r["samples_to_target"] = hit["samples"] if hit else None
        r["_target_at_first_eval"] = bool(hit and hit["first_point"])


def target_text(cell: SeedGroup, key: str, target: dict | None) -> str:
    """A cell's steps or samples to target: the mean over the seeds that reached it (± their std), with
    "k/n seeds reached it" when not all did; "never" when none did; "—" when no target applies."""
    if target is None or cell.seq_len != target["seq_len"]:
        return "—"
    reached, n = cell.values(key), len(cell.runs)
    if not reached:
        return "never"
    std = cell.std(key)
    shown = fmt_count(cell.mean(key)) + (f" ± {fmt_count(std)}" if std is not None else "")
    return shown if len(reached) == n else f"{shown} ({len(reached)}/{n} seeds reached it)"


def _steps_to_target(cells: list[SeedGroup], names, target: dict | None, factor: float) -> list[str]:
    if target is None:
        return []
    out = []
    for name in names:
        rungs = ladder(cells, name)
        if len(rungs) >= 2:
            out.append(_perfect_scaling(name, rungs, factor))
    early = [r for c in cells for r in c.runs if r.get("_target_at_first_eval")]
    if early:
        shown = "; ".join(f"{r['optimizer']} batch {r['batch_schedule']} seed {r['seed']}" for r in early[:MAX_LISTED])
        out.append(f"{len(early)} run(s) were already at the target loss at their first eval point ({shown}"
                   f"{'; ...' if len(early) > MAX_LISTED else ''}): their steps and samples to target are that "
                   "point's, an upper bound; evaluate more often to resolve them.")
    return out


def _perfect_scaling(name: str, rungs: list[SeedGroup], factor: float) -> str:
    """Up to which batch the steps to target stay within ``factor`` of perfect scaling (the base rung's steps x
    base batch / batch), and the speed-up in steps from the base to the largest batch that reached the target."""
    base = rungs[0]
    base_steps = base.mean("steps_to_target")
    if base_steps is None:
        return f"{name}: its base rung (batch {base.batch_schedule}) never reached the target loss."
    last, off = base, None
    for c in rungs[1:]:
        steps = c.mean("steps_to_target")
        ratio = None if steps is None else steps / (base_steps * base.batch / c.batch)
        if ratio is None or ratio > factor:
            off = (f"batch {c.batch_schedule} never reached the target" if ratio is None
                   else f"at batch {c.batch_schedule} they are {ratio:.3g}x the perfect-scaling count")
            break
        last = c
    if off is None:
        text = (f"{name}: steps to target stay within {fmt(factor)}x of perfect scaling (steps halve when the "
                f"batch doubles) up to batch {last.batch_schedule}, the top of its ladder.")
    else:
        where = f"up to batch {last.batch_schedule}" if last is not base else "at no rung above its base"
        text = (f"{name}: steps to target stay within {fmt(factor)}x of perfect scaling (steps halve when the "
                f"batch doubles) {where}; {off}.")
    top = [c for c in rungs if c.mean("steps_to_target") is not None][-1]
    if top is not base:
        top_steps = top.mean("steps_to_target")
        text += (f" From batch {base.batch_schedule} to {top.batch_schedule} (the largest batch that reached it) the "
                 f"steps to target fall from {fmt_count(base_steps)} to {fmt_count(top_steps)}: a "
                 f"{base_steps / top_steps:.3g}x speed-up in steps (perfect scaling: {top.batch / base.batch:g}x).")
    return text


# --- the gradient noise scale (McCandlish et al. 2018)


def _noise_scale(cells: list[SeedGroup], names, holds: dict) -> list[str]:
    """The workload's measured critical batch and where the ladder's rungs and its loss degradation sit
    relative to it. B_simple is a property of where training is, not of the rung, so every run of the ladder
    whose estimate is measurable contributes (the median of their last-half values). The estimate of a run
    whose small batch is tiny (a half of batch 2 is 1 sample) can fail: its mean |G|^2 estimate is then not
    positive, and the sentence names those runs."""
    out = []
    for name in names:
        rungs = ladder(cells, name)
        values = [v for c in rungs for v in c.values("b_noise")]
        if not values:
            continue
        b_noise = statistics.median(values)
        text = (f"Measured critical batch ({name}): the gradient noise scale B_simple, averaged over the last half "
                f"of each run, is ~{fmt_count(b_noise)} samples: the median of the {len(values)} run(s) of its ladder "
                f"where it is measurable (range {fmt_count(min(values))} to {fmt_count(max(values))}; B_simple grows "
                "as the loss falls, so this is the workload's scale near the end of these runs).")
        missing = [f"{c.batch_schedule}" for c in rungs for _ in range(len(c.runs) - len(c.values("b_noise")))]
        if missing:
            text += (f" Not measurable in {len(missing)} run(s) (batch {', '.join(missing)}): their mean |G|^2 estimate"
                     " over the last half was not positive, which the two-batch estimator allows when its small "
                     "batch holds a few samples.")
        beyond = [c for c in rungs if c.batch > b_noise]
        if beyond:
            listed = ", ".join(c.batch_schedule for c in beyond)
            text += (f" {'Rungs' if len(beyond) > 1 else 'Rung'} {listed} {'lie' if len(beyond) > 1 else 'lies'} "
                     f"beyond the measured noise scale (~{fmt_count(b_noise)} samples).")
        else:
            text += (f" No rung of its ladder lies beyond it: the largest batch, {rungs[-1].batch_schedule}, is "
                     "below the measured noise scale.")
        h = holds.get(name)
        if h is not None:
            off = h["first_off"][0] if h["first_off"] else None
            first_beyond = beyond[0] if beyond else None
            text += (f" The first rung not shown to hold the base's loss is "
                     f"{off.batch_schedule if off else 'none'}, the first beyond B_noise is "
                     f"{first_beyond.batch_schedule if first_beyond else 'none'}"
                     f"{_degradation_vs_noise(off, first_beyond)}.")
        out.append(text)
    return out


def _degradation_vs_noise(off: SeedGroup | None, beyond: SeedGroup | None) -> str:
    """Where the first rung not shown to hold sits against the noise scale (a fact, not a cause)."""
    if off is None:
        return ": every rung holds" + ("" if beyond is None else ", even beyond the noise scale")
    if beyond is None:
        return ": a rung stops being shown to hold although none is beyond the noise scale"
    if off is beyond:
        return ": it is the first rung beyond the noise scale"
    return (": it lies below the noise scale" if off.batch < beyond.batch
            else ": it lies above the first rung beyond the noise scale")


def _differing_keys(configs: list[dict]) -> list[str]:
    keys = set().union(*configs) if configs else set()
    return sorted(k for k in keys if len({repr(c.get(k)) for c in configs}) > 1)


def _configurations(cells: list[SeedGroup], candidate: str, baseline: str) -> list[str]:
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


def _head_to_head(cells: list[SeedGroup], candidate: str, key: str = "eval_loss", untrained: dict | None = None,
                  barely: dict | None = None) -> list[str]:
    """Candidate against every other optimizer at the batch sizes both ran (the paper: LAMB beats LARS), by the
    interval of their difference (margin 0: which is lower, if the seeds can tell); an optimizer that did not
    train is left out, with the reason."""
    candidate_cells = {c.batch_schedule: c for c in ladder(cells, candidate)}
    out = []
    for other in sorted({c.optimizer for c in cells} - {candidate}, key=optimizer_rank):
        theirs = {c.batch_schedule: c for c in ladder(cells, other)}
        shared = [b for b in candidate_cells if b in theirs]
        if not shared:
            continue
        if other in (untrained or {}):
            out.append(f"{other} is left out of every comparison: its base rung's loss {untrained[other]:.4f} does not "
                       "beat the unigram baseline, so it never trained (a wider lr x warmup search would be needed).")
            continue
        words = []
        for b in shared:
            g = P.gap_interval(candidate_cells[b].values(key), theirs[b].values(key), higher_is_better=False)
            if g is None:
                words.append(f"{b}: {candidate_cells[b].fmt(key)} vs {theirs[b].fmt(key)} (one seed each: no interval)")
            else:
                side = "lower" if g.hi < 0 else "higher" if g.lo > 0 else "not distinguishable"
                words.append(f"{b}: {side} ({g.gap:+.3g} [{g.lo:+.3g}, {g.hi:+.3g}])")
        caveat = (f" {other}'s base rung is only {barely[other]:.3g} nats below the unigram baseline: it barely "
                  "trained, so a lower loss than it says little about the optimizers." if other in (barely or {}) else "")
        out.append(f"{candidate} against {other}, {key.replace('_', ' ')} difference at each shared batch: "
                   + "; ".join(words) + "." + caveat)
    return out


def _mixed_batch(cells: list[SeedGroup]) -> list[str]:
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


def _downstream(cells: list[SeedGroup], done: list[dict], candidate: str) -> list[str]:
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
    floors = [r[random_key] for r in done if r.get(random_key) is not None]
    if floors:
        out.append(f"The downstream floor: the same fine-tuning from a random init scores {fmt(sum(floors) / len(floors))} "
                   f"{metric} (a classifier that learns only the label frequencies lands about there); pretrained "
                   "scores near it say the probe cannot tell these pretrained models apart.")
    if paired:
        better = sum(r[key] > r[random_key] for r in paired)
        out.append(f"Pretraining helps downstream in {better} of {len(paired)} run(s) scored both ways "
                   f"(pretrained vs random-init fine-tuning {metric})"
                   + ("." if better == len(paired) else "; where it does not, the pretraining taught little."))
    return out


def _throughput(cells: list[SeedGroup], candidate: str) -> list[str]:
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
