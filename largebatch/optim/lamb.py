"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes", arXiv 1904.00962, ICLR 2020), Algorithm 2 of the final (v5) version.

For every tensor x with gradient g, at step t::

    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
    r = m_hat / (sqrt(v_hat) + eps)          m_hat = m/(1-b1^t), v_hat = v/(1-b2^t) (bias correction)
    u = r + wd*x                             decoupled weight decay, inside the norm
    x = x - lr * ratio * u,   ratio = clip(min(||x||, clamp_weight_norm) / ||u||)

with ratio := 1 when ||x|| or ||u|| is 0. Tensors in a group with ``adapt=False`` (biases and norm
weights by default, see :mod:`largebatch.optim.param_groups`) take ratio 1, i.e. exactly Adam with
decoupled decay (AdamW); with their default weight decay of 0 they follow plain Adam.

Variants are registry entries (:mod:`largebatch.optim`), not classes: ``lamb`` (v5 above),
``lamb_v3`` (bias_correction=False), ``lamb_v1`` (trust_clip=10), ``lambc`` (trust_clip=1, timm's
"trust_clip"), ``nvlamb`` (grad_clip_norm=1: the global gradient norm is clipped to 1 before the update,
as NVIDIA's apex FusedLAMB and DeepLearningExamples do). Options left at None take the defaults of the
registry entry ``lamb`` (the paper's betas, the authors' code's eps; sources next to them), their one
home. The shared skeleton (options, state, path choice) is :mod:`largebatch.optim._trust_ratio`.

Implementation it follows: the paper's formulas, checked step by step against a float64 per-tensor
reference (tests/test_optim.py); the structure of the multi-tensor path follows timm's ``Lamb``
(timm/optim/lamb.py). Paths (``implementation``): ``"cpp"`` a fused two-pass CPU kernel (see
:mod:`largebatch.optim._cpp`), ``"triton"`` the same two passes for CUDA tensors (apex FusedLAMB's
design, :mod:`largebatch.optim._triton`), ``"foreach"`` ``torch._foreach_*`` ops (any device),
``"auto"`` the Triton kernel for dense CUDA tensors and the C++ kernel for contiguous fp32 CPU tensors
when they build, else foreach. bfloat16/float16 parameters keep float32 moments.

Deviations from / differences to other implementations, all deliberate:

- timm ``Lamb``: defaults to ``max_grad_norm=1.0`` (a global pre-clip, i.e. NVLAMB) and adapts only
  tensors with weight decay != 0 (unless ``always_adapt``); here the pre-clip is off (``nvlamb`` turns it
  on) and adaptation is chosen per group, independently of decay. With ``max_grad_norm=None`` and the
  same groups the two agree (tested).
- torch_optimizer ``Lamb``: no bias correction by default (v3) and clamps ||x|| at 10 (``clamp_value``)
  instead of the ratio, the v1 mix-up; ``lamb_v3`` with ``clamp_weight_norm=10`` reproduces it. Its
  ``debias=True`` puts eps outside the bias correction (m/(sqrt(v)+eps) * sqrt(bc2)/bc1), which is not
  the paper's formula, so it is not matched.
- The step count is per parameter group (as timm), not per tensor: a tensor that got no gradient on
  some step still sees the group's bias correction advance.
- phi (the scaling of ||x||) is the identity, as in every experiment of the paper, optionally clamped
  to [0, clamp_weight_norm] (LAMB v1's phi).
"""

from __future__ import annotations

import math

import torch

from . import _common, _cpp
from ._trust_ratio import GroupBatch, TrustRatioOptimizer, as_float32


class Lamb(TrustRatioOptimizer):
    """LAMB (arXiv 1904.00962 Alg. 2, v5). Options left at None take registry entry ``lamb``'s default.
    Param-group key ``adapt`` (default True) turns the trust ratio on or off per group. See the module
    docstring for the variants and deviations."""

    registry_name = "lamb"
    kernel = "lamb_step"
    kernel_states = 2

    def __init__(self, params, lr: float, *, weight_decay: float = 0.0,
                 betas: tuple[float, float] | None = None, eps: float | None = None,
                 bias_correction: bool | None = None, trust_clip=None,
                 clamp_weight_norm: float | None = None, grad_clip_norm: float | None = None,
                 implementation: str | None = None):
        super().__init__(params, lr, weight_decay, betas=betas, eps=eps, bias_correction=bias_correction,
                         trust_clip=trust_clip, clamp_weight_norm=clamp_weight_norm,
                         grad_clip_norm=grad_clip_norm, implementation=implementation)

    def _check(self, options: dict) -> None:
        betas = options["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        options["betas"] = tuple(betas)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _begin_group_step(self, group: dict) -> None:
        group["step"] = group.get("step", 0) + 1  # per group, as timm (see the deviations)

    def _cpp_row(self, group: dict, grad_scale: float) -> _cpp.LambColumns:
        b1, b2 = group["betas"]
        bc1, bc2 = _bias_corrections(group)
        lo, hi = _common.parse_trust_clip(group["trust_clip"])
        return _cpp.LambColumns(
            lr=group["lr"], wd=group["weight_decay"], b1=b1, b2=b2, one_minus_b1=1 - b1, one_minus_b2=1 - b2,
            inv_bc1=1 / bc1, inv_sqrt_bc2=1 / math.sqrt(bc2), eps=group["eps"], grad_scale=grad_scale,
            clamp_w=_cpp.no_clamp(group["clamp_weight_norm"]), clip_lo=lo, clip_hi=hi, adapt=group["adapt"])

    def _foreach_group(self, batch: GroupBatch, grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        return _foreach_lamb(batch.group, batch.params, batch.grads, *batch.states, grad_scale)


def _bias_corrections(group) -> tuple[float, float]:
    b1, b2 = group["betas"]
    t = group["step"]
    return (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)


def _foreach_lamb(group, xs, gs, ms, vs, scale) -> torch.Tensor | None:
    """One group with torch._foreach_* ops (any device). Returns the group's trust ratios, or None."""
    b1, b2 = group["betas"]
    bc1, bc2 = _bias_corrections(group)
    wd = group["weight_decay"]
    if scale is not None:  # NVLAMB pre-clip; out of place so that p.grad keeps the raw gradient
        gs = torch._foreach_mul(gs, scale.to(gs[0].device))
    gs = as_float32(gs)  # 16-bit params keep float32 moments
    torch._foreach_lerp_(ms, gs, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_mul_(denom, 1 / math.sqrt(bc2))
    torch._foreach_add_(denom, group["eps"])
    update = torch._foreach_div(ms, denom)
    del denom
    torch._foreach_mul_(update, 1 / bc1)
    if wd != 0:
        torch._foreach_add_(update, xs, alpha=wd)
    ratios = None
    if group["adapt"]:
        ratios = _common.safe_ratio(_common.weight_norms(xs, group["clamp_weight_norm"]),
                                    _common.stacked_norms(update), *_common.parse_trust_clip(group["trust_clip"]))
        torch._foreach_mul_(update, list(ratios.unbind(0)))
    torch._foreach_add_(xs, update, alpha=-group["lr"])
    return ratios
