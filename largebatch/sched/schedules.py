"""Per-step learning-rate schedules: linear warmup, then one of several decays.

``build_schedule`` returns a plain function ``lr(step)``, so it drives any loop (set the lr on the
optimizer's param groups each step) or a ``torch.optim.lr_scheduler.LambdaLR`` via
``lambda s: lr(s) / peak_lr``.

Convention (one time variable for every smooth piece): the lr of step ``s`` (0-based) is the schedule
evaluated at ``t = s + 1``, the number of steps completed once step ``s`` is done. Hence

- warmup: ``lr(s) = init + (target - init) * (s + 1) / W`` for ``s < W``: step 0 already moves
  (no wasted zero-lr step), and step ``W - 1``, the W-th warmup step, is the first at the peak;
- linear / poly / cosine decay run over the remaining ``T - W`` steps with progress
  ``p = (s + 1 - W) / (T - W)``, so the last step ``T - 1`` lands exactly on ``end_lr``;
- exponential / step decays are per EPOCH, and look at the epoch the step lies in,
  ``epoch = s / steps_per_epoch``, so the whole first epoch runs at the peak.

During warmup the ramp's ``target`` is what the decay would give at that step: the peak for the smooth
decays (they start after warmup), and the per-epoch value for exponential/step, so a milestone that
falls inside a long (e.g. LEGW-scaled) warmup gives no jump when warmup ends (the "gradual warmup" of
Goyal et al., arXiv 1706.02677).

Papers: LAMB (arXiv 1904.00962) uses linear warmup + polynomial decay of power 1 (``linear``), as BERT
does; LEGW (arXiv 1901.08256) keeps each baseline's own decay after its warmup, e.g. the per-epoch
exponential decay of the PTB LSTM baselines (``exponential`` with ``decay_start_epoch``) and
milestones for ResNet-50 (``step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from largebatch.errors import ConfigError

SCHEDULES = ("constant", "linear", "poly", "cosine", "exponential", "step")

# Guards floor() and >= against float noise such as 1.1 - 0.1 = 0.99999...: a step exactly on an
# epoch boundary must count as in the new epoch.
_EPS = 1e-9


def build_schedule(
    name: str,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    steps_per_epoch: int,
    warmup_init_lr: float = 0.0,
    power: float = 1.0,
    end_lr: float = 0.0,
    gamma: float = 0.1,
    milestones: Sequence[float] = (),
    decay_start_epoch: float = 0.0,
) -> Callable[[int], float]:
    """Return ``lr(step)`` for ``step`` in ``[0, total_steps)``; see the module docstring for the convention.

    Steps past the end return the last step's lr, because ``LambdaLR`` evaluates one step beyond the
    final optimizer step; negative steps raise ``ValueError``.
    """
    _check_run(name, total_steps, warmup_steps, steps_per_epoch)
    _check_values(name, peak_lr, warmup_init_lr, power, gamma, milestones, decay_start_epoch)
    milestones = tuple(float(m) for m in milestones)

    def decay(step: int) -> float:
        """The lr after warmup, and the warmup's target before its end."""
        if name == "constant":
            return peak_lr
        if name == "exponential":
            return peak_lr * gamma ** math.floor(max(0.0, step / steps_per_epoch - decay_start_epoch) + _EPS)
        if name == "step":
            return peak_lr * gamma ** sum(1 for m in milestones if step / steps_per_epoch + _EPS >= m)
        # linear / poly / cosine: progress is 0 until warmup ends, 1/(T-W) at the first decay step and
        # 1 at the last step (s = T-1).
        decay_steps = total_steps - warmup_steps
        progress = max(0, step + 1 - warmup_steps) / decay_steps if decay_steps > 0 else 0.0
        if name == "cosine":
            return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        p = 1.0 if name == "linear" else power  # "linear" is LAMB's polynomial decay of power 1
        return end_lr + (peak_lr - end_lr) * (1.0 - progress) ** p

    def lr(step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        step = min(step, total_steps - 1)
        target = decay(step)
        if step < warmup_steps:
            return warmup_init_lr + (target - warmup_init_lr) * (step + 1) / warmup_steps
        return target

    return lr


def check_schedule(
    name: str,
    *,
    warmup_init_lr: float = 0.0,
    power: float = 1.0,
    gamma: float = 0.1,
    milestones: Sequence[float] = (),
    decay_start_epoch: float = 0.0,
) -> None:
    """The schedule's name and own values, checked before the run's length is known (``lb-plan`` and
    ``lb-train`` alike, from ``largebatch.config.validate``); :func:`build_schedule` checks them again."""
    _check_name(name)
    _check_values(name, 0.0, warmup_init_lr, power, gamma, milestones, decay_start_epoch)


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)} (schedule=NAME)")


def _check_run(name: str, total: int, warmup: int, steps_per_epoch: int) -> None:
    _check_name(name)
    if total <= 0:
        raise ConfigError(f"the run has {total} steps; train for more epochs or use a smaller batch")
    if steps_per_epoch <= 0:
        raise ConfigError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0 steps, got {warmup}; check schedule.warmup_epochs")
    if warmup > total:
        raise ConfigError(
            f"warmup ({warmup} steps = {warmup / steps_per_epoch:.4g} epochs) is longer than the run ({total} steps); "
            "lower schedule.warmup_epochs or train longer"
        )


def _check_values(name, peak, warmup_init_lr, power, gamma, milestones, decay_start_epoch) -> None:
    for key, value in (("peak lr", peak), ("schedule.warmup_init_lr", warmup_init_lr)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} must be a finite lr >= 0, got {value}")
    if name == "poly" and not power > 0:
        raise ConfigError(f"schedule.power must be > 0 for poly decay, got {power}")
    if name in ("exponential", "step") and not 0 < gamma <= 1:
        raise ConfigError(f"schedule.gamma must be in (0, 1] (the lr multiplier per decay), got {gamma}")
    if name == "step" and any(m < 0 for m in milestones):
        raise ConfigError(f"schedule.milestones are epochs and must be >= 0, got {list(milestones)}")
    if decay_start_epoch < 0:
        raise ConfigError(f"schedule.decay_start_epoch must be >= 0, got {decay_start_epoch}")
