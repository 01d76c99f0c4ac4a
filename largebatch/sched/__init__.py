"""Batch-size scaling rules, learning-rate schedules and batch-size schedules (pure Python; no torch, Hydra
or transformers).

Typical use, with every duration in epochs::

    per_epoch = steps_per_epoch(num_samples, batch)
    scaled = apply_scaling("legw", batch=batch, ref_batch=256, ref_lr=1e-3, ref_warmup_epochs=0.1)
    lr = build_schedule("linear", peak_lr=scaled.lr, total_steps=epochs_to_steps(epochs, per_epoch),
                        warmup_steps=epochs_to_steps(scaled.warmup_epochs, per_epoch), steps_per_epoch=per_epoch)
"""

from largebatch.sched.batch_schedule import BATCH_SCHEDULES, LR_RULES, Phase, batch_phases
from largebatch.sched.durations import epochs_to_steps, steps_per_epoch
from largebatch.sched.scaling import RULES, Scaled, apply_scaling
from largebatch.sched.schedules import SCHEDULES, build_schedule

__all__ = [
    "BATCH_SCHEDULES",
    "LR_RULES",
    "Phase",
    "RULES",
    "SCHEDULES",
    "Scaled",
    "apply_scaling",
    "batch_phases",
    "build_schedule",
    "epochs_to_steps",
    "steps_per_epoch",
]
