"""Optimizers for large-batch training: LAMB and LARS variants plus torch baselines, by name.

    from largebatch.optim import create_optimizer, trust_ratio_stats, OPTIMIZERS
    opt = create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
    ...; opt.step(); trust_ratio_stats(opt)  # {"trust_ratio/min": ..., "trust_ratio/mean": ..., ...}

Variants are entries of :data:`OPTIMIZERS` (one class per algorithm, other defaults), as in timm.
Depends on torch only. ``implementation`` for LAMB/LARS: ``"auto"`` (C++ kernel for fp32 CPU tensors
when it builds, else foreach), ``"cpp"``, ``"foreach"`` (any device, CUDA included); for the torch
baselines: ``"auto"`` (fused where supported, else foreach), ``"fused"``, ``"foreach"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import baselines
from .lamb import Lamb
from .lars import Lars
from .param_groups import build_param_groups, describe_groups

__all__ = ["OPTIMIZERS", "Lamb", "Lars", "OptimizerSpec", "build_cpu_kernels", "build_param_groups",
           "create_optimizer", "describe_groups", "trust_ratio_stats"]


def build_cpu_kernels() -> bool:
    """Build (or load from torch's extension cache) the C++ CPU kernels now, e.g. before timing starts;
    otherwise the first CPU step of LAMB/LARS does it. False if the build failed (foreach is used)."""
    from . import _cpp

    return _cpp.load() is not None


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry: a builder and the default of every option it accepts (None = off)."""

    builder: Callable[..., torch.optim.Optimizer]
    defaults: dict = field(default_factory=dict)
    adapts: bool = False  # has trust ratios (accepts exclude_from_adaptation)
    help: str = ""


_EXCLUDE = {"exclude_from_weight_decay": None}
_LAMB = dict(betas=(0.9, 0.999), eps=1e-6, bias_correction=True, trust_clip=None, clamp_weight_norm=None,
             grad_clip_norm=None, implementation="auto", exclude_from_adaptation=None, **_EXCLUDE)
_LARS = dict(momentum=0.9, nesterov=False, trust_coefficient=0.001, eps=1e-8, trust_clip=None,
             clamp_weight_norm=None, grad_clip_norm=None, implementation="auto",
             exclude_from_adaptation=None, **_EXCLUDE)
_LARS_PAPER = {k: v for k, v in _LARS.items() if k not in ("nesterov", "eps")} | {"trust_coefficient": 1.0}
_ADAM = dict(betas=(0.9, 0.999), eps=1e-8, grad_clip_norm=None, implementation="auto", **_EXCLUDE)
_SGD = dict(momentum=0.9, nesterov=False, grad_clip_norm=None, implementation="auto", **_EXCLUDE)


def _lamb(**overrides):
    return OptimizerSpec(Lamb, {**_LAMB, **overrides}, adapts=True)


def _lars(mode, defaults, **overrides):
    return OptimizerSpec(lambda params, **kw: Lars(params, mode=mode, **kw), {**defaults, **overrides},
                         adapts=True)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "lamb": _lamb(),  # arXiv 1904.00962 v5, Alg. 2
    "lamb_v3": _lamb(bias_correction=False),  # v3 of the paper dropped bias correction
    "lamb_v1": _lamb(trust_clip=10.0),  # v1 clipped the trust ratio at 10
    "nvlamb": _lamb(grad_clip_norm=1.0),  # NVIDIA: global grad norm clipped to 1 before the update
    "lambc": _lamb(trust_clip=1.0),  # timm's trust_clip: ratio <= 1
    "lars_paper": _lars("lamb_paper", _LARS_PAPER),  # LAMB paper Alg. 1: normalises the momentum
    "lars": _lars("lars", _LARS),  # You, Gitman, Ginsburg 2017, as apex/timm
    "larc": _lars("larc", _LARS, trust_clip=1.0),  # apex LARC clip mode: min(local_lr/lr, 1)
    "adamw": OptimizerSpec(baselines.adamw, dict(_ADAM)),
    "adam": OptimizerSpec(baselines.adam, dict(_ADAM)),
    "adagrad": OptimizerSpec(baselines.adagrad, dict(eps=1e-10, grad_clip_norm=None, implementation="auto",
                                                     **_EXCLUDE)),
    "sgd": OptimizerSpec(baselines.sgd, dict(_SGD)),
    "nesterov": OptimizerSpec(baselines.sgd, dict(_SGD, nesterov=True)),
}


def create_optimizer(
    model_or_params: nn.Module | Iterable,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    **options,
) -> torch.optim.Optimizer:
    """Build registry entry ``name``. Options left at None take the entry's default.

    Given an ``nn.Module``, parameter groups are built by :func:`build_param_groups` (biases and norm
    weights: no decay, no trust ratio; sizes are logged). Given ``(name, tensor)`` pairs, the same by
    name patterns only. Given tensors or param-group dicts, they are used as they are.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    unknown = sorted(k for k, v in options.items() if k not in spec.defaults and v is not None)
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take option(s) {unknown}; valid options: "
                         f"{', '.join(spec.defaults)}")
    opts = {**spec.defaults, **{k: v for k, v in options.items() if v is not None}}
    excl_wd = opts.pop("exclude_from_weight_decay")
    excl_adapt = opts.pop("exclude_from_adaptation", None)
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    if not isinstance(model_or_params, nn.Module):
        model_or_params = list(model_or_params)
    named = isinstance(model_or_params, nn.Module) or (
        bool(model_or_params) and all(isinstance(x, tuple) and len(x) == 2 for x in model_or_params))
    if named:
        params = build_param_groups(model_or_params, weight_decay, excl_wd, excl_adapt, adapts=spec.adapts)
    elif excl_wd is not None or excl_adapt is not None:
        raise ValueError("exclude_from_* patterns need parameter names: pass the module or named_parameters()")
    else:
        params = model_or_params
    return spec.builder(params, lr=lr, weight_decay=weight_decay, **opts)


def trust_ratio_stats(opt: torch.optim.Optimizer, per_layer: bool = False) -> dict[str, float]:
    """min/mean/max trust ratio over the adapted tensors of the LAST step ({} if none or not LAMB/LARS).

    ``per_layer=True`` adds ``trust_ratio/<param name>`` (names known when a module was given, else
    ``param<i>`` by position in the optimizer)."""
    params, ratios = getattr(opt, "_last_trust_ratios", (None, None))
    if ratios is None or ratios.numel() == 0:
        return {}
    r = ratios.detach().float().cpu()
    stats = {"trust_ratio/min": r.min().item(), "trust_ratio/mean": r.mean().item(),
             "trust_ratio/max": r.max().item()}
    if per_layer:
        names, i = {}, 0
        for group in opt.param_groups:
            group_names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                names[id(p)] = group_names[j] if group_names else f"param{i}"
                i += 1
        stats.update({f"trust_ratio/{names.get(id(p), '?')}": v for p, v in zip(params, r.tolist())})
    return stats
