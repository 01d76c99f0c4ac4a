"""Learning-rate scaling rules for a batch ``k`` times the reference batch.

Each rule maps the hyper-parameters tuned at ``ref_batch`` (peak lr, warmup epochs) to ``batch``:

- ``none``:   keep both (the baseline a sweep compares against).
- ``linear``: lr x k (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv 1706.02677).
- ``sqrt``:   lr x sqrt(k) (Krizhevsky 2014; the LAMB paper's "untuned" recipe, arXiv 1904.00962).
- ``legw``:   lr x sqrt(k) AND warmup epochs x k (LEGW, You, Hseu, Ying et al., arXiv 1901.08256).
  With the run's epochs fixed, steps per epoch shrink by k, so the warmup keeps the same number of
  ITERATIONS at every batch: LAMB's 1/320 of 1000k steps at 512 is 3125 steps, and so is 1/5 of 15625
  at 32k.

The rule is chosen explicitly by the ``scaling`` config group, never guessed from an optimizer's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.errors import ConfigError

RULES = ("none", "linear", "sqrt", "legw")

# rule -> (lr factor, warmup-epochs factor) as functions of k = batch / ref_batch.
_FACTORS = {
    "none": (lambda k: 1.0, lambda k: 1.0),
    "linear": (lambda k: k, lambda k: 1.0),
    "sqrt": (lambda k: math.sqrt(k), lambda k: 1.0),
    "legw": (lambda k: math.sqrt(k), lambda k: k),
}


@dataclass(frozen=True)
class Scaled:
    """The resolved hyper-parameters at ``batch``; logged at start so every run says what it used."""

    rule: str
    k: float  # batch / ref_batch
    lr: float  # peak lr at batch
    warmup_epochs: float  # warmup at batch, in epochs
    lr_factor: float  # lr / ref_lr
    warmup_factor: float  # warmup_epochs / ref_warmup_epochs


def apply_scaling(
    rule: str, *, batch: int, ref_batch: int, ref_lr: float, ref_warmup_epochs: float
) -> Scaled:
    """Scale ``ref_lr`` and ``ref_warmup_epochs`` from ``ref_batch`` to ``batch`` with ``rule``.

    Every rule is the identity at ``batch == ref_batch``.
    """
    if rule not in _FACTORS:
        raise ConfigError(f"unknown scaling rule {rule!r}; choose one of {', '.join(RULES)} (scaling=<rule>)")
    if batch <= 0 or ref_batch <= 0:
        raise ConfigError(
            f"batch and scaling.ref_batch must be positive sample counts, got batch={batch}, "
            f"ref_batch={ref_batch}; valid rules are {', '.join(RULES)}"
        )
    if not math.isfinite(ref_lr) or ref_lr < 0:
        raise ConfigError(f"scaling.ref_lr must be a finite lr >= 0, got {ref_lr}; set optimizer.lr")
    if not math.isfinite(ref_warmup_epochs) or ref_warmup_epochs < 0:
        raise ConfigError(
            f"scaling.ref_warmup_epochs must be a finite number of epochs >= 0, got {ref_warmup_epochs}"
        )
    k = batch / ref_batch
    lr_fn, warmup_fn = _FACTORS[rule]
    lr_factor, warmup_factor = float(lr_fn(k)), float(warmup_fn(k))
    return Scaled(
        rule=rule,
        k=k,
        lr=ref_lr * lr_factor,
        warmup_epochs=ref_warmup_epochs * warmup_factor,
        lr_factor=lr_factor,
        warmup_factor=warmup_factor,
    )
