"""LARS: layer-wise adaptive rate scaling, in the two forms the LAMB paper compares against.

``mode="lars"`` / ``"larc"`` — You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks"
(arXiv 1708.03888, 2017), as libraries ship it (NVIDIA apex ``LARC``, timm ``Lars``). For every tensor::

    local_lr = eta * ||x|| / (||g|| + wd*||x|| + eps)      eta = trust_coefficient (0.001)
    u = local_lr * (g + wd*x)                               the ratio acts BEFORE momentum
    buf = momentum*buf + u ;  x = x - lr * buf              (nesterov: x -= lr*(u + momentum*buf))

``larc`` (apex's "clip" mode) replaces local_lr by min(local_lr/lr, 1), so a tensor's effective rate is
min(local_lr, lr). ``trust_clip`` clips local_lr (lars) or local_lr/lr (larc, default upper bound 1).

``mode="lamb_paper"`` — Algorithm 1 of the LAMB paper (arXiv 1904.00962), which normalises the momentum::

    m = b1*m + (1-b1)*(g + wd*x) ;  x = x - lr * eta*||x|| / ||m|| * m     (b1 = momentum, eta = 1)

For all modes the ratio is 1 when ||x|| or the denominator is 0, and tensors in a group with
``adapt=False`` (biases and norm weights by default) take ratio 1: with mode lars/larc that is exactly
``torch.optim.SGD(momentum, nesterov, weight_decay)``; with lamb_paper it is x -= lr*m on the dampened
momentum (m starts at 0, where torch's SGD would seed its buffer with the first gradient).

Implementation it follows: timm ``Lars`` (timm/optim/lars.py) and apex ``LARC`` for lars/larc, the
paper's formula for lamb_paper. Paths: ``"cpp"`` (two-pass CPU kernel, :mod:`largebatch.optim._cpp`),
``"foreach"`` (any device), ``"auto"``.

Deviations, all deliberate:

- The 2017 paper puts the global lr inside the momentum (v = m*v + lr*local_lr*(g + wd*x); x -= v);
  like apex, timm and torch's SGD the lr here multiplies the buffer. They agree while lr is constant.
- eps (default 1e-8, as apex/timm) sits in the denominator of local_lr; the paper has none.
- timm sets the ratio to 1 when ||g|| = 0; here only when the whole denominator ||g|| + wd*||x|| is 0,
  so a tensor with zero gradient and nonzero decay decays at rate eta instead of at the full lr.
- timm adapts only tensors with weight decay != 0; here adaptation is chosen per group.
"""

from __future__ import annotations

import math

import torch

from . import _common, _cpp

MODES = {"lars": 0, "larc": 1, "lamb_paper": 2}


class Lars(torch.optim.Optimizer):
    """LARS/LARC (arXiv 1708.03888) or LAMB-paper Alg. 1 LARS, chosen by ``mode``. Param-group key
    ``adapt`` (default True) turns the ratio on or off per group."""

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip=None,
        clamp_weight_norm: float | None = None,
        grad_clip_norm: float | None = None,
        mode: str = "lars",
        implementation: str = "auto",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if lr < 0 or weight_decay < 0 or eps < 0 or not 0 <= momentum < 1:
            raise ValueError("lr, weight_decay, eps must be >= 0 and momentum in [0, 1)")
        if nesterov and (momentum <= 0 or mode == "lamb_paper"):
            raise ValueError("nesterov needs momentum > 0 and mode lars or larc")
        if mode == "lamb_paper" and momentum == 0:
            raise ValueError("mode lamb_paper normalises the momentum: momentum must be > 0")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")
        _common.parse_trust_clip(trust_clip)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
            clamp_weight_norm=clamp_weight_norm, mode=mode, adapt=True,
        )
        super().__init__(params, defaults)
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
        groups = []  # (group, params, grads, momentum buffers or None)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            bufs = None
            if group["momentum"] != 0:
                for p in ps:
                    if p.grad.is_sparse:
                        raise RuntimeError("Lars does not support sparse gradients")
                    if "momentum_buffer" not in self.state[p]:
                        # Zero start: with no dampening the first step equals torch SGD's clone(g).
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
            groups.append((group, ps, [p.grad for p in ps], bufs))
        if not groups:
            return loss
        scale = _common.global_grad_scale([g for e in groups for g in e[2]], self.grad_clip_norm)
        tensors = [t for e in groups for lst in e[1:] if lst is not None for t in lst]
        self.last_path = _common.choose_path(self.implementation, tensors)
        if self.last_path == "cpp":
            self._step_cpp(groups, 1.0 if scale is None else float(scale))
        else:
            adapted, ratios = [], []
            for group, ps, gs, bufs in groups:
                r = _foreach_lars(group, ps, gs, bufs, scale)
                if r is not None:
                    adapted += ps
                    ratios.append(r)
            _common.record_trust_ratios(self, adapted, torch.cat(ratios) if ratios else None)
        return loss

    def _step_cpp(self, groups, scale: float) -> None:
        rows, xs, gs, bufs, adapt_mask = [], [], [], [], []
        empty = torch.empty(0)
        for group, ps, grads, group_bufs in groups:
            lo, hi = _common.parse_trust_clip(group["trust_clip"])
            clamp_w = math.inf if group["clamp_weight_norm"] is None else group["clamp_weight_norm"]
            row = [group["lr"], group["weight_decay"], group["momentum"], float(group["nesterov"]),
                   group["trust_coefficient"], group["eps"], scale, clamp_w, lo, hi,
                   float(bool(group["adapt"])), MODES[group["mode"]], 1 - group["momentum"]]
            rows += [row] * len(ps)
            adapt_mask += [bool(group["adapt"])] * len(ps)
            xs += ps
            gs += grads
            bufs += group_bufs if group_bufs is not None else [empty] * len(ps)
        ratios = _cpp.load().lars_step(xs, gs, bufs, torch.tensor(rows, dtype=torch.float64))
        adapted = [p for p, a in zip(xs, adapt_mask) if a]
        _common.record_trust_ratios(self, adapted, ratios[torch.tensor(adapt_mask)] if adapted else None)


def _foreach_lars(group, xs, gs, bufs, scale) -> torch.Tensor | None:
    """One group with torch._foreach_* ops (any device). Returns the group's ratios, or None."""
    wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
    mode = group["mode"]
    lo, hi = _common.parse_trust_clip(group["trust_clip"])
    if scale is not None:
        gs = torch._foreach_mul(gs, scale.to(gs[0].device))
    ratios = None
    if mode == "lamb_paper":
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, torch._foreach_add(gs, xs, alpha=wd), alpha=1 - mom)
        update = bufs
        if group["adapt"]:
            ratios = _common.safe_ratio(group["trust_coefficient"] * _x_norms(group, xs),
                                        _common.stacked_norms(bufs), lo, hi)
            update = torch._foreach_mul(bufs, list(ratios.unbind(0)))
        torch._foreach_add_(xs, update, alpha=-lr)
        return ratios
    if group["adapt"]:
        x_norm = _x_norms(group, xs)
        den = _common.stacked_norms(gs) + wd * x_norm
        ok = (x_norm > 0) & (den > 0)  # eps only guards the division, not the zero rule
        local = group["trust_coefficient"] * x_norm / (den + group["eps"])
        if mode == "larc":
            local = local / lr
        ratios = torch.where(ok, local, torch.ones_like(local)).clamp(min=lo, max=hi)
    update = torch._foreach_add(gs, xs, alpha=wd)  # out of place: p.grad keeps the raw gradient
    if ratios is not None:
        torch._foreach_mul_(update, list(ratios.unbind(0)))
    if bufs is not None:
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, update)
        if group["nesterov"]:
            torch._foreach_add_(update, bufs, alpha=mom)
        else:
            update = bufs
    torch._foreach_add_(xs, update, alpha=-lr)
    return ratios


def _x_norms(group, xs) -> torch.Tensor:
    norms = _common.stacked_norms(xs)
    return norms if group["clamp_weight_norm"] is None else norms.clamp(max=group["clamp_weight_norm"])
