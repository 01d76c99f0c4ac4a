"""The batch-size study protocol: the statistics every ladder's table is judged by (docs/protocol.md).

Both drivers (scripts/reproduce_table1.py, scripts/reproduce_legw.py), their reports and any user study
call these functions; they take plain numbers and run records, and import nothing but the standard library,
so each rule is tested on synthetic records with known answers (tests/test_protocol.py).

The rules, in the order a study applies them:

1. Splits: selection (base lr, warmup, the tuned trials) reads the validation metric (``eval/...``), the
   table reports the test metric (``test/...``).
2. Targets from fresh seeds: the target is the mean of ``n`` seeds of the chosen config that the sweep never
   ran (:func:`target_seeds`).
3. Intervals, not bands: a cell is mean and 95% t interval (:func:`t_interval`); a rung's verdict reads the
   interval of its difference to the target (:func:`gap_interval`) against the declared margin
   (:func:`verdict`): "holds" when the whole interval is better than target - margin, "fails" when the whole
   interval is worse, else "unresolved" with the seeds that would resolve it (:func:`seeds_needed`). Only the
   rung's own seeds and the target's enter a verdict.
4. A tuned oracle per rung: a declared search budget (:func:`tuning_trials`), selected on validation.
5. Curves: the metric at several epoch budgets from one constant-lr run (:func:`metric_at_budget`), and
   accuracy-type metrics averaged over the last evaluations (:func:`final_value`).
6. Steps to result (Shallue et al. 2018, arXiv 1811.03600): the first evaluation that strictly beats the
   target (:func:`steps_to_result`), minimised over trials; McCandlish et al.'s (arXiv 1812.06162)
   ``steps = S_min (1 + B_crit / B)`` fitted to it (:func:`fit_critical_batch`), beside the measured
   B_simple over training (:func:`noise_scale_by_part`).
7. Faithful baselines: Goyal's warmup share (:data:`GOYAL_WARMUP_SHARE`) and the trivial-baseline check
   (:func:`beats_baseline`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
POWER = 0.8  # of the seed count that would resolve an unresolved rung
GOYAL_WARMUP_SHARE = 5 / 90  # Goyal et al. (arXiv 1706.02677) warm up 5 of ResNet-50's 90 epochs
TUNING_LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # the default tuned search: the rule's lr times these
MAX_SEEDS_SAID = 100  # past this, "needs more than 100 seeds" (the gap sits on the margin)


# ---------------------------------------------------------------------- Student's t, without scipy


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`; 1e-10 absolute)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2.0


def _mean(v: Sequence[float]) -> float:
    return math.fsum(v) / len(v)


def _std(v: Sequence[float]) -> float:
    """The sample std in floats (statistics.stdev's exact fractions overflow on blown-up perplexities such as
    1e206; here their spread is inf, and an interval with it resolves nothing)."""
    m = _mean(v)
    with_inf = any(math.isinf(x) for x in v) or not math.isfinite(m)
    if with_inf:
        return math.inf
    total = math.fsum((x - m) * (x - m) for x in v)
    return math.sqrt(total / (len(v) - 1)) if math.isfinite(total) else math.inf


# ---------------------------------------------------------------------- cells and verdicts


def finite(values: Iterable) -> list[float]:
    """The finite numbers of ``values`` (a diverged seed has none: it is counted apart, never averaged)."""
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float | None  # None: one value, no interval
    hi: float | None
    n: int

    def text(self, digits: int = 4) -> str:
        if self.lo is None:
            return f"{self.mean:.{digits}g} (n=1)"
        return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean and the two-sided t interval of the mean; None without values, no bounds with one value."""
    v = finite(values)
    if not v:
        return None
    mean = _mean(v)
    if len(v) < 2:
        return Interval(mean, None, None, 1)
    half = t_quantile(0.5 + confidence / 2, len(v) - 1) * _std(v) / math.sqrt(len(v))
    return Interval(mean, mean - half, mean + half, len(v))


@dataclass(frozen=True)
class Gap:
    """How much worse a rung is than the target (positive: worse), with its interval and the std behind it."""

    gap: float
    lo: float
    hi: float
    df: float
    std: float  # the per-seed std the interval used
    method: str  # "welch" (both sides have seeds) or "pooled on the target's std" (a one-seed rung)


def gap_interval(rung: Sequence[float], target: Sequence[float], higher_is_better: bool,
                 confidence: float = CONFIDENCE) -> Gap | None:
    """The t interval of (rung - target), signed so that positive means worse. Welch's interval when both
    sides have two seeds or more; a one-seed rung borrows the TARGET's seed std (the reference config's
    spread, equal variances assumed, df of the target), never another rung's. None when it cannot be had."""
    r, t = finite(rung), finite(target)
    if not r or len(t) < 2 and len(r) < 2 or not t:
        return None
    sign = -1.0 if higher_is_better else 1.0
    gap = sign * (_mean(r) - _mean(t))
    if len(r) >= 2 and len(t) >= 2:
        vr, vt = _std(r) ** 2 / len(r), _std(t) ** 2 / len(t)
        se = math.sqrt(vr + vt)
        df = ((vr + vt) ** 2 / ((vr ** 2 / (len(r) - 1)) + (vt ** 2 / (len(t) - 1)))
              if 0 < vr + vt < math.inf else len(r) + len(t) - 2)
        std, method = math.sqrt((_std(r) ** 2 + _std(t) ** 2) / 2), "welch"
    else:
        one, many = (r, t) if len(r) < 2 else (t, r)
        std = _std(many)
        se = std * math.sqrt(1 / len(one) + 1 / len(many))
        df, method = len(many) - 1, "pooled on the target's std" if len(r) < 2 else "pooled on the rung's std"
    half = t_quantile(0.5 + confidence / 2, max(df, 1e-9)) * se
    return Gap(gap, gap - half, gap + half, df, std, method)


def seeds_needed(gap: Gap, margin: float, power: float = POWER, confidence: float = CONFIDENCE) -> int | None:
    """Seeds per cell (rung and target alike) for the interval to fall on one side of the margin, were the
    measured gap and std the truth (normal approximation, ``power``); None past :data:`MAX_SEEDS_SAID`."""
    distance = abs(margin - gap.gap)
    if gap.std == 0:
        return 2
    if distance == 0 or not math.isfinite(gap.std):
        return None
    for n in range(2, MAX_SEEDS_SAID + 1):  # t quantiles with 2n - 2 df: a few seeds pay the small-sample price
        df = 2 * n - 2
        if (t_quantile(0.5 + confidence / 2, df) + t_quantile(power, df)) * gap.std * math.sqrt(2 / n) <= distance:
            return n
    return None


@dataclass(frozen=True)
class Verdict:
    word: str  # "holds" | "fails" | "unresolved" | "missing"
    gap: Gap | None
    needs: int | None = None  # unresolved: seeds per cell that would resolve it (None: more than 100)

    @property
    def mark(self) -> str:
        return {"holds": "✓", "fails": "✗", "unresolved": "?", "missing": "✗"}[self.word]

    def text(self) -> str:
        if self.word == "unresolved":
            return "unresolved, needs " + (f"~{self.needs} seeds" if self.needs else f"> {MAX_SEEDS_SAID} seeds")
        return self.word


def verdict(rung: Sequence[float], target: Sequence[float], margin: float, higher_is_better: bool,
            confidence: float = CONFIDENCE) -> Verdict:
    """Does the rung hold the target within ``margin`` (absolute, in the metric's units)? A non-inferiority
    reading of the gap's interval: "holds" when its upper end is at most the margin (a rung better than the
    target holds), "fails" when its lower end is beyond it, "unresolved" otherwise. "missing": no finite seed
    (every seed diverged or failed) counts as failing to hold."""
    if not finite(rung):
        return Verdict("missing", None)
    g = gap_interval(rung, target, higher_is_better, confidence)
    if g is None:
        return Verdict("unresolved", None, None)
    if g.hi <= margin:
        return Verdict("holds", g)
    if g.lo > margin:
        return Verdict("fails", g)
    return Verdict("unresolved", g, seeds_needed(g, margin, confidence=confidence))


def reach(verdicts: Sequence[tuple[int, Verdict]], base_batch: int) -> tuple[int, int]:
    """A ladder's reach by the interval verdicts: (the largest batch up to which every rung holds, the
    largest up to which no rung fails). Between the two the ladder is unresolved."""
    proven = possible = base_batch
    proven_open = possible_open = True
    for batch, v in sorted(verdicts, key=lambda bv: bv[0]):
        proven_open = proven_open and v.word == "holds"
        possible_open = possible_open and v.word not in ("fails", "missing")
        proven = batch if proven_open else proven
        possible = batch if possible_open else possible
    return proven, possible


# ---------------------------------------------------------------------- seeds and targets


def target_seeds(n: int, sweep_seed: int = 0) -> list[int]:
    """The target's fresh seeds: ``n`` seeds the sweep never trained (its runs use ``sweep_seed``)."""
    return [s for s in range(n + 1) if s != sweep_seed][:n]


# ---------------------------------------------------------------------- curves and budgets


def final_value(curve: Sequence[dict], last: int = 1, key: str = "value") -> float | None:
    """The metric at the end of a run: the mean of its last ``last`` evaluations (classification's
    averaging over the last 3, which halves the evaluation noise of one point)."""
    values = finite(p.get(key) for p in curve)
    return _mean(values[-last:]) if values else None


def metric_at_budget(curve: Sequence[dict], epochs: float, last: int = 1, key: str = "value") -> float | None:
    """The metric a run of ``epochs`` epochs would end with, read from a longer constant-lr run's curve
    (points ``{"epoch", key}``): the mean of its last ``last`` evaluations at or before that epoch. None
    when the run has no evaluation that late (or none at all)."""
    upto = [p for p in curve if p.get("epoch") is not None and p["epoch"] <= epochs + 1e-9]
    if not upto or max(p["epoch"] for p in curve) < epochs - 1e-9:
        return None
    return final_value(upto, last, key)


def steps_to_result(curve: Sequence[dict], target: float, higher_is_better: bool, key: str = "value"
                    ) -> dict | None:
    """Shallue et al.'s steps to result: the first evaluation whose metric strictly beats ``target`` (no
    interpolation between evaluations). {"step", "samples", "epoch"} of that point; None: never."""
    for p in curve:
        v = p.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and (v > target if higher_is_better else v < target):
            return {k: p.get(k) for k in ("step", "samples", "epoch")}
    return None


def min_steps_to_result(curves: Iterable[Sequence[dict]], target: float, higher_is_better: bool) -> float | None:
    """The fewest steps to ``target`` over trials (the tuned row's: the best trial at each rung)."""
    hits = [h["step"] for c in curves if (h := steps_to_result(c, target, higher_is_better)) is not None]
    return min(hits) if hits else None


# ---------------------------------------------------------------------- the critical batch


@dataclass(frozen=True)
class CriticalBatchFit:
    """McCandlish et al.'s ``steps = S_min (1 + B_crit / B)``, fitted by least squares in 1/B."""

    s_min: float
    b_crit: float
    b_crit_lo: float | None  # 95% interval (delta method, t with n - 2 df); None with two points
    b_crit_hi: float | None
    points: int

    def steps(self, batch: float) -> float:
        return self.s_min * (1 + self.b_crit / batch)

    def text(self) -> str:
        ci = f" [{self.b_crit_lo:.3g}, {self.b_crit_hi:.3g}]" if self.b_crit_lo is not None else " (no interval: 2 points)"
        return f"S_min {self.s_min:.3g} steps, B_crit {self.b_crit:.3g}{ci} samples ({self.points} rungs)"


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float],
                       confidence: float = CONFIDENCE) -> CriticalBatchFit | None:
    """Fit ``steps = a + b / B`` (a = S_min, b = S_min B_crit) to measured steps to result; None with fewer
    than two rungs or a fit without a positive S_min and B_crit (no curve of that shape)."""
    pts = [(1.0 / b, s) for b, s in zip(batches, steps) if b and s is not None and math.isfinite(s)]
    n = len(pts)
    if n < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx, my = _mean([x for x, _ in pts]), _mean([y for _, y in pts])
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    if intercept <= 0 or slope <= 0:
        return None
    b_crit, lo, hi = slope / intercept, None, None
    if n > 2:
        resid = sum((y - intercept - slope * x) ** 2 for x, y in pts) / (n - 2)
        var_b, var_a = resid / sxx, resid * (1 / n + mx * mx / sxx)
        cov_ab = -mx * resid / sxx
        # delta method for b / a: d/db = 1/a, d/da = -b/a^2
        var = var_b / intercept ** 2 + slope ** 2 * var_a / intercept ** 4 - 2 * slope * cov_ab / intercept ** 3
        half = t_quantile(0.5 + confidence / 2, n - 2) * math.sqrt(max(var, 0.0))
        lo, hi = b_crit - half, b_crit + half
    return CriticalBatchFit(intercept, b_crit, lo, hi, n)


def noise_scale_by_part(train_lines: Sequence[dict], parts: int = 4) -> list[float | None]:
    """The gradient noise scale B_simple in each of ``parts`` equal shares of a run's steps (by quarter by
    default): per share, the mean tr(Sigma) estimate over the mean |G|^2 estimate, in samples (McCandlish et
    al. average each before dividing), from the trainer's "noise/trace", "noise/grad_sq" and "noise/b_simple"
    lines. None for a share without estimates or with a mean |G|^2 that is not positive."""
    lines = [m for m in train_lines if all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k])
                                           for k in ("noise/trace", "noise/grad_sq", "noise/b_simple", "step"))]
    if not lines:
        return [None] * parts
    last = max(m["step"] for m in lines)
    out = []
    for i in range(parts):
        share = [m for m in lines if i * last / parts < m["step"] <= (i + 1) * last / parts]
        per_unit = [m["noise/b_simple"] * m["noise/grad_sq"] / m["noise/trace"] for m in share if m["noise/trace"]]
        grad_sq = statistics.fmean(m["noise/grad_sq"] for m in share) if share else 0.0
        out.append(statistics.fmean(m["noise/trace"] for m in share) / grad_sq * statistics.fmean(per_unit)
                   if share and per_unit and grad_sq > 0 else None)
    return out


# ---------------------------------------------------------------------- the tuned oracle and baselines


def halton(index: int, base: int) -> float:
    """The ``index``-th (from 1) term of the van der Corput sequence in ``base``: quasi-random in (0, 1)."""
    f, r = 1.0, 0.0
    while index > 0:
        f /= base
        r += f * (index % base)
        index //= base
    return r


def tuning_trials(lr: float, warmup: float | None, spec: str = "grid", *, warmup_alt: float | None = None
                  ) -> list[tuple[float, float | None]]:
    """The declared search budget of a tuned rung around a rule's (lr, warmup): ``"grid"`` is the lr times
    :data:`TUNING_LR_FACTORS` at ``warmup`` and, where ``warmup_alt`` is given (a task with warmup), at it too;
    ``"halton:N"`` is N quasi-random trials, log-uniform in [lr/4, 4 lr] and, with ``warmup_alt``, uniform
    between the two warmups. Deterministic, so a resumed driver asks for the same trials."""
    warmups = [warmup] if warmup_alt is None or warmup_alt == warmup else [warmup, warmup_alt]
    if spec == "grid":
        return [(float(f"{lr * f:.4g}"), w) for w in warmups for f in TUNING_LR_FACTORS]
    if spec.startswith("halton:"):
        n = int(spec.split(":", 1)[1])
        if n < 1:
            raise ValueError(f"tuning {spec!r}: N must be at least 1")
        out = []
        for i in range(1, n + 1):
            trial_lr = float(f"{lr * 4 ** (2 * halton(i, 2) - 1):.4g}")
            w = warmup if len(warmups) == 1 else float(f"{warmups[0] + halton(i, 3) * (warmups[1] - warmups[0]):.4g}")
            out.append((trial_lr, w))
        return out
    raise ValueError(f"tuning {spec!r}: use 'grid' or 'halton:N'")


def beats_baseline(values: Sequence[float], baseline: float, higher_is_better: bool) -> bool:
    """Whether a row trained at all: every finite seed beats the trivial baseline (unigram loss, majority
    class), and there is at least one."""
    v = finite(values)
    return bool(v) and all((x > baseline) if higher_is_better else (x < baseline) for x in v)
