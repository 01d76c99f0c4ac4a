"""Batch-size schedules: the global batch grows during a run, in phases of constant batch.

- ``linear``: from ``start_batch`` up by ``increment`` to ``batch``, in equal slices of the first
  ``ramp_epochs``, then ``batch`` to the end. GPT-3's ramp (Brown et al. 2020, arXiv 2005.14165, appendix B:
  32k tokens up to the full batch over the first 4-12B tokens) and Megatron-LM's
  ``--rampup-batch-size <start> <increment> <samples>``, with the ramp's length in epochs.
- ``step``: ``batch``, multiplied by ``factor`` at each of ``milestones`` (epochs): where a step lr schedule
  would multiply the lr by 1/factor, the batch grows instead (Smith, Kindermans, Ying and Le 2017, "Don't
  decay the learning rate, increase the batch size", arXiv 1711.00489: factor 5).

Durations are in epochs, so a phase's samples are the same whatever the batch; the plan turns every phase
into steps (``largebatch.plan``), and every phase's batch must split into micro-batches there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from largebatch.errors import ConfigError

BATCH_SCHEDULES = ("linear", "step")
LR_RULES = ("hold", "scale")  # hold: the lr of `batch` in every phase | scale: the scaling rule at each phase's batch
_KEYS = {"linear": ("start_batch", "increment", "ramp_epochs"), "step": ("milestones", "factor")}


@dataclass(frozen=True)
class Phase:
    batch: int
    start_epoch: float  # the run's epoch at which the phase starts ...
    end_epoch: float  # ... and ends (the next phase's start_epoch, exactly)

    @property
    def epochs(self) -> float:
        return self.end_epoch - self.start_epoch


def batch_phases(name: str, *, batch: int, epochs: float, start_batch: int | None = None,
                 increment: int | None = None, ramp_epochs: float | None = None,
                 milestones: Sequence[float] = (), factor: int | None = None) -> list[Phase]:
    """The phases of a batch schedule over a run of ``epochs``; a schedule that cannot be is one ConfigError."""
    if name not in BATCH_SCHEDULES:
        raise ConfigError(f"batch_schedule.name={name!r} is unknown; choose one of {' | '.join(BATCH_SCHEDULES)} "
                          "(batch_schedule=NAME)")
    values = {"start_batch": start_batch, "increment": increment, "ramp_epochs": ramp_epochs,
              "milestones": list(milestones) or None, "factor": factor}
    for other, keys in _KEYS.items():
        for key in keys:
            if other != name and values[key] is not None:
                raise ConfigError(f"batch_schedule.{key} is set, but batch_schedule={name} does not use it ({other} "
                                  f"does); remove it or choose batch_schedule={other}")
    missing = [key for key in _KEYS[name] if values[key] is None]
    if missing:
        raise ConfigError(f"batch_schedule={name} needs " + ", ".join(f"batch_schedule.{k}" for k in missing))
    return _linear(batch, epochs, start_batch, increment, ramp_epochs) if name == "linear" else \
        _step(batch, epochs, list(milestones), factor)


def _linear(batch: int, epochs: float, start: int, increment: int, ramp_epochs: float) -> list[Phase]:
    if not 0 < start < batch:
        raise ConfigError(f"batch_schedule.start_batch={start} must be > 0 and below batch={batch}: the ramp grows "
                          "up to batch")
    if increment <= 0 or (batch - start) % increment:
        raise ConfigError(f"batch_schedule.increment={increment} must be > 0 and divide batch - start_batch = "
                          f"{batch} - {start} = {batch - start}, so that the ramp ends at batch")
    if not 0 < ramp_epochs < epochs:
        raise ConfigError(f"batch_schedule.ramp_epochs={ramp_epochs} must be > 0 and below epochs={epochs}: the "
                          "run ends at batch")
    n = (batch - start) // increment
    bounds = [ramp_epochs * i / n for i in range(n)] + [ramp_epochs, epochs]
    return [Phase(start + i * increment, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _step(batch: int, epochs: float, milestones: list[float], factor: int) -> list[Phase]:
    if factor < 2:
        raise ConfigError(f"batch_schedule.factor={factor} must be an integer >= 2 (the batch multiplier at each "
                          "milestone; Smith et al.: 5)")
    bounds = [0.0, *(float(m) for m in milestones), float(epochs)]
    if any(b >= c for b, c in zip(bounds, bounds[1:])):
        raise ConfigError(f"batch_schedule.milestones={milestones} must increase strictly and lie inside the run "
                          f"(0, epochs={epochs})")
    return [Phase(batch * factor ** i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
