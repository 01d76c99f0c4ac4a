"""Baselines: torch.optim's AdamW, Adam, Adagrad and SGD (heavy ball / Nesterov), unchanged.

They go through the same factory and parameter groups as LAMB/LARS so that a comparison differs only
in the update rule (Nado et al. 2021 argue tuned baselines match LAMB/LARS; the comparison needs the
same footing). ``implementation``: ``"auto"`` uses torch's fused kernel where the device and dtype
support it (else foreach), ``"fused"`` demands it, ``"foreach"`` the multi-tensor path.
``grad_clip_norm`` clips the global gradient norm in place before each step (a step pre-hook, the same
as calling ``torch.nn.utils.clip_grad_norm_`` in the loop).
"""

from __future__ import annotations

import torch

IMPLEMENTATIONS = ("auto", "fused", "foreach")


def _with_path(cls, params, implementation: str, **kwargs) -> torch.optim.Optimizer:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation for torch baselines must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    params = list(params)
    if implementation in ("auto", "fused"):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            if implementation == "fused":
                raise
    return cls(params, foreach=True, **kwargs)


def _add_grad_clip(opt: torch.optim.Optimizer, max_norm: float | None) -> torch.optim.Optimizer:
    if max_norm is not None:
        def clip(optimizer, args, kwargs):
            grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)

        opt.register_step_pre_hook(clip)
        opt.grad_clip_norm = max_norm
    return opt


def adamw(params, lr, weight_decay, betas, eps, grad_clip_norm, implementation):
    opt = _with_path(torch.optim.AdamW, params, implementation, lr=lr, betas=tuple(betas), eps=eps,
                     weight_decay=weight_decay)
    return _add_grad_clip(opt, grad_clip_norm)


def adam(params, lr, weight_decay, betas, eps, grad_clip_norm, implementation):
    opt = _with_path(torch.optim.Adam, params, implementation, lr=lr, betas=tuple(betas), eps=eps,
                     weight_decay=weight_decay)
    return _add_grad_clip(opt, grad_clip_norm)


def adagrad(params, lr, weight_decay, eps, grad_clip_norm, implementation):
    opt = _with_path(torch.optim.Adagrad, params, implementation, lr=lr, eps=eps, weight_decay=weight_decay)
    return _add_grad_clip(opt, grad_clip_norm)


def sgd(params, lr, weight_decay, momentum, nesterov, grad_clip_norm, implementation):
    opt = _with_path(torch.optim.SGD, params, implementation, lr=lr, momentum=momentum, nesterov=nesterov,
                     weight_decay=weight_decay)
    return _add_grad_clip(opt, grad_clip_norm)
