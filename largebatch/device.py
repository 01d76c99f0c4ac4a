"""What ``auto`` means for the device-dependent settings, in one place: mixed precision and data workers.

- ``precision=auto``: bf16 autocast where the device computes it natively (CUDA with
  ``torch.cuda.is_bf16_supported()``: Ampere and newer; TPU), else fp32 (``"no"``). On CPU, bf16 autocast
  is slower than fp32 on most processors and changes the numbers the tests pin, so auto keeps fp32.
  The resolved value is logged and recorded with the run.
- ``data.num_workers=auto``: on CUDA, data-loader worker processes, so masking a batch never waits in
  the training loop (BERT-base at 480k tokens/s consumes a 2048 x 128 batch in ~0.5 s; masking it takes
  ~25 ms on one core), with pinned host memory for asynchronous copies; on CPU, 0 (the model wants the
  cores, and the per-batch masking is cheap).
"""

from __future__ import annotations

import os

import torch

from largebatch.errors import ConfigError

MAX_AUTO_WORKERS = 4  # more buys nothing for per-batch tensor masking, and each holds a copy of the dataset


def resolve_device_type(device_setting: str) -> str:
    """'cuda' or 'cpu' for ``cfg.device`` (auto | cpu | cuda), as the trainer picks its device."""
    if device_setting == "cpu" or (device_setting == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def resolve_precision(precision: str, device_type: str) -> str:
    """Accelerate's ``mixed_precision`` for ``precision`` (auto | no | bf16 | fp16) on ``device_type``."""
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    if device_type == "xla":
        return "bf16"
    return "no"


def resolve_num_workers(setting, device_type: str, local_world_size: int = 1) -> tuple[int, bool]:
    """(workers, pin_memory) for ``data.num_workers`` (auto or a number) on ``device_type``.

    auto on CUDA: this process's share of the CPU cores, less one for the training loop, at most
    MAX_AUTO_WORKERS and at least 1; auto on CPU: 0. Pinned memory whenever the device is CUDA."""
    pin = device_type == "cuda"
    if setting == "auto":
        if device_type != "cuda":
            return 0, pin
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local_world_size) - 1)), pin
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"data.num_workers={setting!r} must be auto or a whole number >= 0")
    return setting, pin
