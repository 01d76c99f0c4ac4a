"""LARS as Algorithm 1 of the LAMB paper (You et al., arXiv 1904.00962, ICLR 2020): the trust ratio
normalises the dampened MOMENTUM, not the gradient. For every tensor x with gradient g::

    m = b1*m + (1-b1)*(g + wd*x)                     b1 = momentum (0.9), wd coupled (inside m)
    x = x - lr * eta * ||x|| / ||m|| * m             eta = trust_coefficient (1.0: phi = identity)

with ratio := 1 when ||x|| or ||m|| is 0, clipped by ``trust_clip`` and with ||x|| clamped by
``clamp_weight_norm`` when given. Tensors in a group with ``adapt=False`` (biases and norm weights by
default) take ratio 1: x -= lr*m on the dampened momentum (m starts at 0, where torch's SGD would seed its
buffer with the first gradient). Options left at None take the defaults of the registry entry
``lars_paper``, their one home.

This is not the LARS of 2017 (:mod:`largebatch.optim.lars`): there the ratio eta*||x||/(||g|| + wd*||x||)
scales g + wd*x before an undampened heavy-ball momentum, with eta = 0.001. Implementation it follows:
the paper's formula, checked against a float64 reference (tests/test_optim.py). Paths: ``"cpp"``
(``lars_step`` of :mod:`largebatch.optim._cpp`, mode ``lars_paper``), ``"triton"`` (the same on CUDA,
:mod:`largebatch.optim._triton`), ``"foreach"`` (any device), ``"auto"``; the shared skeleton is
:mod:`largebatch.optim._trust_ratio`.
"""

from __future__ import annotations

import torch

from . import _common, _cpp
from ._trust_ratio import GroupBatch, TrustRatioOptimizer, as_float32


class LarsPaper(TrustRatioOptimizer):
    """LARS of the LAMB paper's Algorithm 1. Options left at None take registry entry ``lars_paper``'s
    default. Param-group key ``adapt`` (default True) turns the ratio on or off per group."""

    registry_name = "lars_paper"
    kernel = "lars_step"
    kernel_states = 1

    def __init__(self, params, lr: float, *, weight_decay: float = 0.0, momentum: float | None = None,
                 trust_coefficient: float | None = None, trust_clip=None,
                 clamp_weight_norm: float | None = None, grad_clip_norm: float | None = None,
                 implementation: str | None = None):
        super().__init__(params, lr, weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                         trust_clip=trust_clip, clamp_weight_norm=clamp_weight_norm,
                         grad_clip_norm=grad_clip_norm, implementation=implementation)

    def _check(self, options: dict) -> None:
        if not 0 < options["momentum"] < 1:
            raise ValueError(f"lars_paper normalises the momentum: momentum must be in (0, 1), "
                             f"got {options['momentum']}")

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _cpp_row(self, group: dict, grad_scale: float) -> _cpp.LarsColumns:
        lo, hi = _common.parse_trust_clip(group["trust_clip"])
        return _cpp.LarsColumns(
            lr=group["lr"], wd=group["weight_decay"], momentum=group["momentum"], nesterov=False,
            trust_coefficient=group["trust_coefficient"], eps=0.0, grad_scale=grad_scale,
            clamp_w=_cpp.no_clamp(group["clamp_weight_norm"]), clip_lo=lo, clip_hi=hi, adapt=group["adapt"],
            mode=_cpp.LARS_MODES["lars_paper"], one_minus_momentum=1 - group["momentum"])

    def _foreach_group(self, batch: GroupBatch, grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        return _foreach_lars_paper(batch.group, batch.params, batch.grads, *batch.states, grad_scale)


def _foreach_lars_paper(group, xs, gs, ms, scale) -> torch.Tensor | None:
    """One group with torch._foreach_* ops (any device). Returns the group's ratios, or None."""
    mom = group["momentum"]
    if scale is not None:
        gs = torch._foreach_mul(gs, scale.to(gs[0].device))
    gs = as_float32(gs)  # 16-bit params keep a float32 momentum
    torch._foreach_mul_(ms, mom)
    torch._foreach_add_(ms, torch._foreach_add(gs, xs, alpha=group["weight_decay"]), alpha=1 - mom)
    update, ratios = ms, None
    if group["adapt"]:
        ratios = _common.safe_ratio(group["trust_coefficient"] * _common.weight_norms(xs, group["clamp_weight_norm"]),
                                    _common.stacked_norms(ms), *_common.parse_trust_clip(group["trust_clip"]))
        update = torch._foreach_mul(ms, list(ratios.unbind(0)))
    torch._foreach_add_(xs, update, alpha=-group["lr"])
    return ratios
