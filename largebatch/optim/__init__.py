"""Optimizers for large-batch training: LAMB and LARS variants plus torch baselines, by name.

    from largebatch.optim import create_optimizer, trust_ratio_stats, OPTIMIZERS
    opt = create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
    ...; opt.step(); trust_ratio_stats(opt)  # {"trust_ratio/min": ..., "trust_ratio/mean": ..., ...}

Variants are entries of :data:`OPTIMIZERS` (one class per algorithm, other defaults), as in timm; the
registry is the one home of every option's default (the classes fill options left at None from it, the
YAML files under conf/optimizer/ state only what differs). :func:`describe_optimizers` lists them.
Depends on torch only (Triton, which ships with torch, for the CUDA kernel). ``implementation`` for
LAMB/LARS: ``"auto"`` (the Triton kernel for dense CUDA tensors, the C++ kernel for fp32 CPU tensors,
when they build; else foreach), ``"triton"``, ``"cpp"``, ``"foreach"`` (any device); for the torch
baselines: ``"auto"`` (fused where supported and every parameter is dense, else foreach), ``"fused"``,
``"foreach"``. Parameters sharded by FSDP2 (DTensors) take foreach under ``"auto"`` (fused Adam/AdamW
for the baselines), so trust ratios and clip norms are those of whole tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import baselines
from ._trust_ratio import TrustRatioOptimizer
from .lamb import Lamb
from .lars import Lars
from .lars_paper import LarsPaper
from .param_groups import build_param_groups, describe_groups

__all__ = ["OPTIMIZERS", "Lamb", "Lars", "LarsPaper", "OptimizerSpec", "build_cpu_kernels", "build_param_groups",
           "create_optimizer", "describe_groups", "describe_optimizers", "trust_ratio_stats"]


def build_cpu_kernels() -> bool:
    """Build (or load from torch's extension cache) the C++ CPU kernels now, e.g. before timing starts;
    otherwise the first CPU step of LAMB/LARS does it. False if the build failed (foreach is used)."""
    from . import _cpp

    return _cpp.load() is not None


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry, plain data (after timm's ``OptimInfo``)."""

    name: str
    cls: type[torch.optim.Optimizer]  # ours (a TrustRatioOptimizer) or one of baselines.TORCH_BASELINES
    description: str  # one line: what it is and where it comes from
    defaults: Mapping[str, Any]  # every option it takes, with its default (None = off)
    base: str | None = None  # the entry it is a variant of: describe_optimizers() lists what differs

    def __post_init__(self):  # an entry's own read-only copy: entries may be built from shared dicts
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def adapts(self) -> bool:
        """Has trust ratios (and accepts exclude_from_adaptation)."""
        return issubclass(self.cls, TrustRatioOptimizer)


# Shared option sets. Sources: LAMB betas 0.9/0.999 (paper, all experiments), eps 1e-6 (the authors' BERT
# code); LARS eta 0.001 and momentum 0.9 (2017 paper), eps 1e-8 (apex/timm); the LAMB paper's LARS has
# eta 1 (phi = identity); Adam eps 1e-8 and betas (Kingma & Ba 2015); Adagrad eps 1e-10 (torch).
_BASE = dict(grad_clip_norm=None, implementation="auto", exclude_from_weight_decay=None)
_ADAPT = dict(trust_clip=None, clamp_weight_norm=None, exclude_from_adaptation=None, **_BASE)
_LAMB = dict(betas=(0.9, 0.999), eps=1e-6, bias_correction=True, **_ADAPT)
_LARS = dict(mode="lars", momentum=0.9, nesterov=False, trust_coefficient=0.001, eps=1e-8,
             lr_in_momentum=False, **_ADAPT)
_ADAM = dict(betas=(0.9, 0.999), eps=1e-8, **_BASE)
_SGD = dict(momentum=0.9, nesterov=False, **_BASE)

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec(name="lamb", cls=Lamb, defaults=_LAMB,
                  description="LAMB, arXiv 1904.00962 v5 Alg. 2: Adam step rescaled per tensor by ||x||/||step||"),
    OptimizerSpec(name="lamb_v3", cls=Lamb, base="lamb", defaults=dict(_LAMB, bias_correction=False),
                  description="LAMB as in v3 of arXiv 1904.00962, without bias correction"),
    OptimizerSpec(name="lamb_v1", cls=Lamb, base="lamb", defaults=dict(_LAMB, trust_clip=10.0),
                  description="LAMB as in v1 of arXiv 1904.00962, which clipped the trust ratio"),
    OptimizerSpec(name="nvlamb", cls=Lamb, base="lamb", defaults=dict(_LAMB, grad_clip_norm=1.0),
                  description="NVLAMB (apex FusedLAMB, NVIDIA's BERT recipe): LAMB after a global grad-norm clip"),
    OptimizerSpec(name="lambc", cls=Lamb, base="lamb", defaults=dict(_LAMB, trust_clip=1.0),
                  description="LAMBC (timm's trust_clip=True): LAMB with the trust ratio capped"),
    OptimizerSpec(name="lars_paper", cls=LarsPaper, defaults=dict(momentum=0.9, trust_coefficient=1.0, **_ADAPT),
                  description="LARS as LAMB paper Alg. 1 (arXiv 1904.00962): step lr*||x||/||m||*m on dampened "
                              "momentum"),
    OptimizerSpec(name="lars", cls=Lars, defaults=_LARS,
                  description="LARS, arXiv 1708.03888 as apex/timm: g + wd*x scaled by eta*||x||/(||g|| + "
                              "wd*||x||), then momentum"),
    OptimizerSpec(name="larc", cls=Lars, base="lars", defaults=dict(_LARS, mode="larc", trust_clip=1.0),
                  description="LARC (apex LARC clip mode): LARS with each tensor's rate capped at lr"),
    OptimizerSpec(name="lars_mlperf", cls=Lars, base="lars", defaults=dict(_LARS, lr_in_momentum=True),
                  description="LARS as MLPerf's ResNet-50 / TensorFlow: lr inside the momentum, v = m*v + "
                              "lr*ratio*(g + wd*x)"),
    OptimizerSpec(name="adamw", cls=torch.optim.AdamW, defaults=_ADAM,
                  description="AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay"),
    OptimizerSpec(name="adam", cls=torch.optim.Adam, defaults=_ADAM,
                  description="Adam (Kingma & Ba 2015): weight decay coupled as L2"),
    OptimizerSpec(name="adagrad", cls=torch.optim.Adagrad, defaults=dict(eps=1e-10, **_BASE),
                  description="Adagrad (Duchi et al. 2011)"),
    OptimizerSpec(name="sgd", cls=torch.optim.SGD, defaults=_SGD, description="SGD with heavy-ball momentum"),
    OptimizerSpec(name="nesterov", cls=torch.optim.SGD, base="sgd", defaults=dict(_SGD, nesterov=True),
                  description="SGD with Nesterov momentum, the tuned baseline of Nado et al. 2021"),
]}


def _changes(spec: OptimizerSpec) -> str:
    """What the entry changes relative to its base ("lamb + grad_clip_norm=1.0"), or the class it builds."""
    if spec.base is None:
        module = "torch.optim." if spec.cls.__module__.startswith("torch.") else ""
        return f"{module}{spec.cls.__name__}"
    base = OPTIMIZERS[spec.base].defaults
    diff = [f"{k}={v}" for k, v in spec.defaults.items() if base[k] != v]
    return f"{spec.base} + {', '.join(diff)}"


def describe_optimizers() -> str:
    """A table of every registry entry: its name, what it is built as (a class, or its base entry plus the
    defaults it changes) and a one-line description."""
    rows = [("name", "is", "description")]
    rows += [(spec.name, _changes(spec), spec.description) for spec in OPTIMIZERS.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}" for row in rows]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len('description')}")
    return "\n".join(lines)


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
    if spec.adapts:
        return spec.cls(params, lr=lr, weight_decay=weight_decay, **opts)
    return baselines.build(spec.cls, params, lr=lr, weight_decay=weight_decay, **opts)


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
