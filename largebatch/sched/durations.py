"""Durations in epochs -> optimizer steps: the one place that conversion happens.

Configs give every duration in epochs (or fractions of the run), as big_vision's ``utils.steps`` does,
so a batch sweep keeps the number of samples seen constant: LAMB's Table 1 trains every batch size for
the same epochs (1000k steps at 512 ... 15.6k at 32k, arXiv 1904.00962), and LEGW's rule is stated in
warmup EPOCHS (arXiv 1901.08256). Nothing else in the package should multiply epochs by a batch size.
"""

from __future__ import annotations

import math

from largebatch.errors import ConfigError


def steps_per_epoch(num_samples: int, batch: int) -> int:
    """Full global batches in one pass over ``num_samples``: ``floor(num_samples / batch)``.

    Every optimizer step sees exactly ``batch`` samples; the partial tail batch is dropped, because a
    smaller last batch would be a step at a different batch size than the one the lr was scaled for.
    """
    if num_samples <= 0:
        raise ConfigError(f"the training set is empty ({num_samples} samples); check the data config")
    if batch <= 0:
        raise ConfigError(f"batch must be a positive number of samples per step, got {batch}")
    if batch > num_samples:
        raise ConfigError(
            f"batch {batch} is larger than the training set ({num_samples} samples); "
            "lower batch or use more data"
        )
    return num_samples // batch


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs * steps_per_epoch`` rounded half up; 0 for 0 epochs, at least 1 for any epochs > 0.

    Half up rather than Python's banker's rounding so that the result never goes down when the epochs
    go up. The floor of 1 keeps a short but non-zero warmup from silently vanishing at a large batch.
    """
    if steps_per_epoch <= 0:
        raise ConfigError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if not math.isfinite(epochs) or epochs < 0:
        raise ConfigError(f"a duration in epochs must be a finite number >= 0, got {epochs}")
    if epochs == 0:
        return 0
    return max(1, math.floor(epochs * steps_per_epoch + 0.5))
