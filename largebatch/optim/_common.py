"""Helpers of the trust-ratio optimizers: option parsing, path choice, grad pre-clip, norms, ratio records."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor

from . import _cpp

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "cpp", "foreach")
_warned: set[str] = set()


def parse_trust_clip(value) -> tuple[float, float]:
    """``None`` -> no clip; ``upper`` -> [0, upper]; ``[lower, upper]`` (either may be None) -> as given."""
    if value is None:
        return 0.0, math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = 0.0, float(value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo = 0.0 if value[0] is None else float(value[0])
        hi = math.inf if value[1] is None else float(value[1])
    else:
        raise ValueError(f"trust_clip must be None, an upper bound or [lower, upper], got {value!r}")
    if not 0.0 <= lo <= hi:
        raise ValueError(f"trust_clip needs 0 <= lower <= upper, got {value!r}")
    return lo, hi


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    return name


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (a parameter sharded by FSDP2's ``fully_shard``, or its gradient or state)."""
    return isinstance(t, DTensor)


def choose_path(requested: str, tensors: list[torch.Tensor]) -> str:
    """'cpp' when asked for (or 'auto') and every tensor is a contiguous fp32 CPU tensor, else 'foreach'.

    Sharded tensors (DTensors) always take foreach: a DTensor holds only this rank's shard, and the kernel
    would read its unallocated global storage, whereas DTensor's foreach norms reduce over the shards,
    so every trust ratio is that of the whole tensor. 'auto' falls back to foreach with one logged
    warning when the kernel cannot be built; an explicit 'cpp' raises instead, so a benchmark never
    silently measures the wrong path.
    """
    if requested == "foreach" or not tensors:
        return "foreach"
    if any(is_sharded(t) for t in tensors):
        if requested == "cpp":
            raise ValueError("implementation='cpp' cannot step sharded (FSDP2 / DTensor) parameters: the C++ kernel "
                             "sees one shard, not the whole tensor its trust ratio needs; use implementation="
                             "'auto' or 'foreach'")
        return "foreach"
    fits = all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.is_sparse
        for t in tensors
    )
    if not fits:
        if requested == "cpp":
            raise ValueError("implementation='cpp' needs contiguous float32 CPU params, grads and state")
        return "foreach"
    if _cpp.load() is None:
        if requested == "cpp":
            raise RuntimeError(f"implementation='cpp' but the C++ kernel failed to build: {_cpp.failure()}")
        _warn_once("largebatch.optim: C++ kernel unavailable, falling back to the foreach implementation")
        return "foreach"
    return "cpp"


def global_grad_scale(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    """Factor 1/max(1, ||g||/max_norm) of NVLAMB's global pre-clip (a 0-d tensor; None when off)."""
    if max_norm is None or not grads:
        return None
    norms = foreach_norms(grads)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    return 1.0 / (total / max_norm).clamp(min=1.0)


def safe_ratio(num: torch.Tensor, den: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """num/den with ratio := 1 where either is 0, then clipped to [lo, hi]."""
    ok = (num > 0) & (den > 0)
    ratio = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))
    return ratio.clamp(min=lo, max=hi)


def foreach_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """||t|| per tensor, accumulated in fp32 at least: a 16-bit norm keeps ~3 significant digits. (DTensors
    have no dtype= form; FSDP2 keeps its sharded parameters in fp32.)"""
    if any(t.dtype == torch.float64 or is_sharded(t) for t in tensors):
        return torch._foreach_norm(tensors)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32)


def stacked_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(foreach_norms(tensors))


def weight_norms(xs: list[torch.Tensor], clamp: float | None) -> torch.Tensor:
    """||x|| per tensor, clamped to [0, clamp] when given (LAMB v1's phi; ``clamp_weight_norm``)."""
    norms = stacked_norms(xs)
    return norms if clamp is None else norms.clamp(max=clamp)


def record_trust_ratios(opt: torch.optim.Optimizer, params: list[torch.Tensor], ratios: torch.Tensor | None):
    """Keep the last step's ratios of ADAPTED tensors for :func:`largebatch.optim.trust_ratio_stats`.

    Ratios of sharded parameters are DTensors (of whole-tensor norms, equal on every rank): kept as the
    plain tensor they stand for, here, where every rank takes part in the step."""
    if ratios is not None and is_sharded(ratios):
        ratios = ratios.full_tensor()
    opt._last_trust_ratios = (params, ratios)
