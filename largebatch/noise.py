"""The gradient noise scale: where large batches stop paying (McCandlish et al. 2018, arXiv 1812.06162).

B_simple = tr(Sigma) / |G|^2, with Sigma the per-sample gradient covariance and G the true gradient,
predicts the critical batch size: below it, doubling the batch nearly halves the steps to a target;
above it, it does not. Its estimator (their Appendix A.1) needs the squared norms of two gradient
estimates of the same step, at batch sizes B_small < B_big:

    |G|^2    ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)

Both are unbiased but very noisy one step at a time, so each is averaged over a window of steps
before dividing, as the paper does. The trainer measures on log steps only:

- g_big is the step's gradient (all micro-batches, all ranks): the norm the trainer takes anyway;
- g_small is the first micro-batch's gradient, read before the second one accumulates into it (under
  DDP a rank's local gradient, before the all-reduce; averaged over ranks). A step of a single
  micro-batch has none, so on log steps the trainer computes the gradient of the first half of that
  micro-batch separately (one extra forward and backward of half a micro-batch, every ``log_every``
  steps), under a forked RNG so the run's own trajectory is the same with or without the probe.

Batch sizes are counted in the task's loss units (masked tokens, sentences, samples) because the
gradients are means over those; B_simple is reported in samples (units x samples per unit).
"""

from __future__ import annotations

import math
from collections import deque

PREFIX = "noise/"  # the logged keys: estimates that depend on how a step is split, by design


class NoiseScale:
    """Running window of the two unbiased estimates; ``state`` is plain lists (saved with checkpoints)."""

    def __init__(self, window: int, state: dict | None = None):
        self.window = window
        state = state or {}
        self.grad_sq = deque(state.get("grad_sq", []), maxlen=window)
        self.trace = deque(state.get("trace", []), maxlen=window)
        self.samples_per_unit = deque(state.get("samples_per_unit", []), maxlen=window)

    def add(self, small_sq: float, small_units: float, big_sq: float, big_units: float, big_samples: int) -> None:
        """One step's estimates from the squared norms of the mean gradients over ``small_units`` and
        ``big_units`` loss units (the big batch holding ``big_samples`` samples)."""
        if not (0 < small_units < big_units) or not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return
        self.grad_sq.append((big_units * big_sq - small_units * small_sq) / (big_units - small_units))
        self.trace.append((small_sq - big_sq) / (1.0 / small_units - 1.0 / big_units))
        self.samples_per_unit.append(big_samples / big_units)

    def metrics(self) -> dict:
        """The window's means, and B_simple in samples (None while |G|^2's mean is not positive)."""
        if not self.grad_sq:
            return {}
        grad_sq = sum(self.grad_sq) / len(self.grad_sq)
        trace = sum(self.trace) / len(self.trace)
        per_unit = sum(self.samples_per_unit) / len(self.samples_per_unit)
        b_simple = trace / grad_sq * per_unit if grad_sq > 0 else None
        return {f"{PREFIX}grad_sq": grad_sq, f"{PREFIX}trace": trace, f"{PREFIX}b_simple": b_simple}

    def state_dict(self) -> dict:
        return {"grad_sq": list(self.grad_sq), "trace": list(self.trace),
                "samples_per_unit": list(self.samples_per_unit)}
