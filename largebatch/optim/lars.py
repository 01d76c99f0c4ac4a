"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg, "Large Batch Training of Convolutional
Networks", arXiv 1708.03888, 2017), as libraries ship it (NVIDIA apex ``LARC``, timm ``Lars``).

``mode="lars"``: for every tensor::

    local_lr = eta * ||x|| / (||g|| + wd*||x|| + eps)      eta = trust_coefficient (0.001)
    u = local_lr * (g + wd*x)                               the ratio acts BEFORE momentum
    buf = momentum*buf + u ;  x = x - lr * buf              (nesterov: x -= lr*(u + momentum*buf))

``mode="larc"`` (registry entry ``larc``, apex's "clip" mode) replaces local_lr by min(local_lr/lr, 1), so
a tensor's effective rate is min(local_lr, lr). ``trust_clip`` clips local_lr (lars) or local_lr/lr (larc,
default upper bound 1). The LARS of the LAMB paper's Algorithm 1, which normalises the momentum instead,
is :class:`largebatch.optim.lars_paper.LarsPaper` (registry entry ``lars_paper``).

``lr_in_momentum=True`` (registry entry ``lars_mlperf``) is the form of MLPerf's ResNet-50 reference, from
TensorFlow's LARS (mlcommons/training, image_classification/tensorflow/official/resnet/
mlperf_lars_optimizer.py and tensorflow2/lars_optimizer.py: ``apply_momentum`` with lr 1 on
``grad * scaled_lr``)::

    buf = momentum*buf + lr*local_lr*(g + wd*x) ;  x = x - buf
    (nesterov: x = x - lr*local_lr*(g + wd*x) - momentum*buf)

which is the 2017 paper's too. It equals the default form while lr is constant and differs while the lr
changes (warmup, decay): the buffer remembers each step at the lr of that step. The C++ kernel does not
have it: on CPU a step with ``lr_in_momentum`` in any group runs the foreach path (``"auto"`` chooses it;
``"cpp"`` is refused with a ValueError); the Triton kernel has it.

The ratio is 1 when ||x|| or the denominator is 0, and tensors in a group with ``adapt=False`` (biases
and norm weights by default) take ratio 1: that is exactly ``torch.optim.SGD(momentum, nesterov,
weight_decay)``. Options left at None take the defaults of the registry entry ``lars``, their one home.

Implementation it follows: timm ``Lars`` (timm/optim/lars.py) and apex ``LARC``. Paths: ``"cpp"``
(two-pass CPU kernel, :mod:`largebatch.optim._cpp`), ``"triton"`` (two-pass CUDA kernel,
:mod:`largebatch.optim._triton`), ``"foreach"`` (any device), ``"auto"``; the shared skeleton is
:mod:`largebatch.optim._trust_ratio`.

Deviations, all deliberate:

- The 2017 paper puts the global lr inside the momentum (v = m*v + lr*local_lr*(g + wd*x); x -= v);
  by default, like apex, timm and torch's SGD, the lr here multiplies the buffer. They agree while lr is
  constant; ``lr_in_momentum=True`` selects the paper's (and MLPerf's) form.
- eps (default 1e-8, as apex/timm) sits in the denominator of local_lr; the paper has none.
- timm sets the ratio to 1 when ||g|| = 0; here only when the whole denominator ||g|| + wd*||x|| is 0,
  so a tensor with zero gradient and nonzero decay decays at rate eta instead of at the full lr.
- timm adapts only tensors with weight decay != 0; here adaptation is chosen per group.
"""

from __future__ import annotations

import torch

from . import _common, _cpp
from ._trust_ratio import GroupBatch, TrustRatioOptimizer, as_float32

MODES = ("lars", "larc")


class Lars(TrustRatioOptimizer):
    """LARS / LARC (arXiv 1708.03888), chosen by ``mode``. Options left at None take registry entry
    ``lars``'s default. Param-group key ``adapt`` (default True) turns the ratio on or off per group."""

    registry_name = "lars"
    kernel = "lars_step"
    kernel_states = 1

    def __init__(self, params, lr: float, *, weight_decay: float = 0.0, mode: str | None = None,
                 momentum: float | None = None, nesterov: bool | None = None,
                 trust_coefficient: float | None = None, eps: float | None = None, trust_clip=None,
                 clamp_weight_norm: float | None = None, grad_clip_norm: float | None = None,
                 implementation: str | None = None, lr_in_momentum: bool | None = None):
        super().__init__(params, lr, weight_decay, mode=mode, momentum=momentum, nesterov=nesterov,
                         trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
                         clamp_weight_norm=clamp_weight_norm, grad_clip_norm=grad_clip_norm,
                         implementation=implementation, lr_in_momentum=lr_in_momentum)

    def _cpp_supports(self) -> bool:
        return not any(g.get("lr_in_momentum") for g in self.param_groups)

    def _check(self, options: dict) -> None:
        if options["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {options['mode']!r} (the LAMB paper's LARS "
                             "is LarsPaper, registry entry lars_paper)")
        if not 0 <= options["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {options['momentum']}")
        if options["nesterov"] and options["momentum"] <= 0:
            raise ValueError("nesterov needs momentum > 0")

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        # Zero start: with no dampening the first step equals torch SGD's clone(g).
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _cpp_row(self, group: dict, grad_scale: float) -> _cpp.LarsColumns:
        lo, hi = _common.parse_trust_clip(group["trust_clip"])
        return _cpp.LarsColumns(
            lr=group["lr"], wd=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"], grad_scale=grad_scale,
            clamp_w=_cpp.no_clamp(group["clamp_weight_norm"]), clip_lo=lo, clip_hi=hi, adapt=group["adapt"],
            mode=_cpp.LARS_MODES[group["mode"]], one_minus_momentum=1 - group["momentum"])

    def _foreach_group(self, batch: GroupBatch, grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        bufs = batch.states[0] if batch.states else None
        return _foreach_lars(batch.group, batch.params, batch.grads, bufs, grad_scale)


def _foreach_lars(group, xs, gs, bufs, scale) -> torch.Tensor | None:
    """One group with torch._foreach_* ops (any device). Returns the group's ratios, or None."""
    wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
    if scale is not None:
        gs = torch._foreach_mul(gs, scale.to(gs[0].device))
    gs = as_float32(gs)  # 16-bit params: the update is formed in float32 (the buffers are float32)
    ratios = None
    if group["adapt"]:
        x_norm = _common.weight_norms(xs, group["clamp_weight_norm"])
        den = _common.stacked_norms(gs) + wd * x_norm
        ok = (x_norm > 0) & (den > 0)  # eps only guards the division, not the zero rule
        local = group["trust_coefficient"] * x_norm / (den + group["eps"])
        if group["mode"] == "larc":
            local = local / lr
        lo, hi = _common.parse_trust_clip(group["trust_clip"])
        ratios = torch.where(ok, local, torch.ones_like(local)).clamp(min=lo, max=hi)
    update = torch._foreach_add(gs, xs, alpha=wd)  # out of place: p.grad keeps the raw gradient
    if ratios is not None:
        torch._foreach_mul_(update, list(ratios.unbind(0)))
    lr_inside = group.get("lr_in_momentum", False)  # absent from checkpoints saved before the option
    if lr_inside:  # MLPerf / TensorFlow: the buffer accumulates lr-scaled steps
        torch._foreach_mul_(update, lr)
    if bufs is not None:
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, update)
        if group["nesterov"]:
            torch._foreach_add_(update, bufs, alpha=mom)
        else:
            update = bufs
    torch._foreach_add_(xs, update, alpha=-1.0 if lr_inside else -lr)
    return ratios
