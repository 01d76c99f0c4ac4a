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
as NVIDIA's apex FusedLAMB and DeepLearningExamples do).

Implementation it follows: the paper's formulas, checked step by step against a float64 per-tensor
reference (tests/test_optim.py); the structure of the multi-tensor path follows timm's ``Lamb``
(timm/optim/lamb.py). Paths (``implementation``): ``"cpp"`` a fused two-pass CPU kernel (see
:mod:`largebatch.optim._cpp`), ``"foreach"`` ``torch._foreach_*`` ops (any device, CUDA included),
``"auto"`` the kernel for contiguous fp32 CPU tensors when it builds, else foreach.

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


class Lamb(torch.optim.Optimizer):
    """LAMB (arXiv 1904.00962 Alg. 2, v5). Param-group key ``adapt`` (default True) turns the trust
    ratio on or off per group. See the module docstring for the variants and deviations."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        trust_clip=None,
        clamp_weight_norm: float | None = None,
        grad_clip_norm: float | None = None,
        implementation: str = "auto",
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")
        _common.parse_trust_clip(trust_clip)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            trust_clip=trust_clip, clamp_weight_norm=clamp_weight_norm, adapt=True,
        )
        super().__init__(params, defaults)
        # Global options: the pre-clip needs the norm over ALL groups, the path is chosen for all at once.
        self.grad_clip_norm = grad_clip_norm
        self.implementation = _common.check_implementation(implementation)
        self.last_path: str | None = None

    def state_dict(self):
        sd = super().state_dict()
        sd["grad_clip_norm"] = self.grad_clip_norm
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.grad_clip_norm = state_dict.pop("grad_clip_norm", self.grad_clip_norm)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []  # (group, params, grads, exp_avgs, exp_avg_sqs)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            group["step"] = group.get("step", 0) + 1
            states = [self.state[p] for p in ps]
            groups.append((group, ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states]))
        if not groups:
            return loss
        all_grads = [g for entry in groups for g in entry[2]]
        scale = _common.global_grad_scale(all_grads, self.grad_clip_norm)
        tensors = [t for entry in groups for lst in entry[1:] for t in lst]
        self.last_path = _common.choose_path(self.implementation, tensors)
        if self.last_path == "cpp":
            self._step_cpp(groups, 1.0 if scale is None else float(scale))
        else:
            adapted, ratios = [], []
            for group, ps, gs, ms, vs in groups:
                r = _foreach_lamb(group, ps, gs, ms, vs, scale)
                if r is not None:
                    adapted += ps
                    ratios.append(r)
            _common.record_trust_ratios(self, adapted, torch.cat(ratios) if ratios else None)
        return loss

    def _step_cpp(self, groups, scale: float) -> None:
        rows, xs, gs, ms, vs, adapt_mask = [], [], [], [], [], []
        for group, ps, grads, exp_avgs, exp_avg_sqs in groups:
            b1, b2 = group["betas"]
            t = group["step"]
            bc1, bc2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
            lo, hi = _common.parse_trust_clip(group["trust_clip"])
            clamp_w = math.inf if group["clamp_weight_norm"] is None else group["clamp_weight_norm"]
            row = [group["lr"], group["weight_decay"], b1, b2, 1 - b1, 1 - b2, 1 / bc1, 1 / math.sqrt(bc2), group["eps"],
                   scale, clamp_w, lo, hi, float(bool(group["adapt"]))]
            rows += [row] * len(ps)
            adapt_mask += [bool(group["adapt"])] * len(ps)
            xs += ps
            gs += grads
            ms += exp_avgs
            vs += exp_avg_sqs
        hp = torch.tensor(rows, dtype=torch.float64)
        ratios = _cpp.load().lamb_step(xs, gs, ms, vs, hp)
        mask = torch.tensor(adapt_mask)
        adapted = [p for p, a in zip(xs, adapt_mask) if a]
        _common.record_trust_ratios(self, adapted, ratios[mask] if adapted else None)


def _foreach_lamb(group, xs, gs, ms, vs, scale) -> torch.Tensor | None:
    """One group with torch._foreach_* ops (any device). Returns the group's trust ratios, or None."""
    b1, b2 = group["betas"]
    t = group["step"]
    bc1, bc2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
    wd = group["weight_decay"]
    if scale is not None:  # NVLAMB pre-clip; out of place so that p.grad keeps the raw gradient
        gs = torch._foreach_mul(gs, scale.to(gs[0].device))
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
        x_norm = _common.stacked_norms(xs)
        if group["clamp_weight_norm"] is not None:
            x_norm = x_norm.clamp(max=group["clamp_weight_norm"])
        ratios = _common.safe_ratio(x_norm, _common.stacked_norms(update),
                                    *_common.parse_trust_clip(group["trust_clip"]))
        torch._foreach_mul_(update, list(ratios.unbind(0)))
    torch._foreach_add_(xs, update, alpha=-group["lr"])
    return ratios
