"""Parameter groups: which tensors get weight decay and which get a trust ratio, decided in one place.

Default rule (``exclude_*`` left at None): a tensor is EXCLUDED when it belongs to a normalisation
module (LayerNorm, BatchNorm*, GroupNorm, InstanceNorm*, RMSNorm, LocalResponseNorm) or its name
matches one of :data:`DEFAULT_EXCLUDE_PATTERNS` (biases, "LayerNorm"/"layer_norm" as in the LAMB
authors' BERT code, anything with "norm" in its name). Excluded tensors get weight decay 0 and, for
LAMB/LARS, no trust ratio: the authors' BERT code uses the decay-exclusion list for adaptation too.

A user list of patterns replaces the default rule: each is a regular expression searched in the full
parameter name (``re.search``, as the authors' ``_do_use_weight_decay``); ``[]`` excludes nothing.
``exclude_from_adaptation=None`` means "same as the weight-decay exclusion".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

log = logging.getLogger("largebatch.optim")

DEFAULT_EXCLUDE_PATTERNS = ("bias", "LayerNorm", "layer_norm", "norm")
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _norm_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        # Also catch custom norm classes (e.g. a hand-written "BertLayerNorm") by their class name.
        if isinstance(mod, NORM_TYPES) or "norm" in type(mod).__name__.lower():
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False))
    return names


def _matcher(patterns: Sequence[str] | None, norm_names: set[str]):
    if patterns is None:
        compiled = [re.compile(p) for p in DEFAULT_EXCLUDE_PATTERNS]
        return lambda name: name in norm_names or any(c.search(name) for c in compiled)
    if isinstance(patterns, str):
        raise ValueError(f"exclusion patterns must be a list of strings, got the string {patterns!r}")
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.search(name) for c in compiled)


def build_param_groups(
    named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    exclude_from_weight_decay: Sequence[str] | None = None,
    exclude_from_adaptation: Sequence[str] | None = None,
    adapts: bool = True,
) -> list[dict]:
    """Groups of ``(name, tensor)`` pairs (torch keeps the names as ``param_names``), each with its
    ``weight_decay`` and, when ``adapts``, ``adapt``. Empty groups are dropped; sizes are logged."""
    if isinstance(named_params, nn.Module):
        norm_names = _norm_param_names(named_params)
        named = list(named_params.named_parameters())
    else:
        norm_names, named = set(), list(named_params)
    no_decay = _matcher(exclude_from_weight_decay, norm_names)
    no_adapt = no_decay if exclude_from_adaptation is None else _matcher(exclude_from_adaptation, norm_names)
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        key = (not no_decay(name), adapts and not no_adapt(name))
        buckets.setdefault(key, []).append((name, p))
    groups = []
    for (decay, adapt), params in sorted(buckets.items(), reverse=True):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if adapts:
            group["adapt"] = adapt
        groups.append(group)
    log.info("optimizer param groups:\n%s", describe_groups(groups))
    return groups


def describe_groups(groups: list[dict]) -> str:
    """One line per group: decay, adaptation, #tensors, #params, a few example names."""
    lines = []
    for g in groups:
        tensors = [p for _, p in g["params"]] if g["params"] and isinstance(g["params"][0], tuple) else g["params"]
        names = [n for n, _ in g["params"]] if tensors is not g["params"] else []
        adapt = "" if "adapt" not in g else f" trust_ratio={'on' if g['adapt'] else 'off'}"
        example = f"  e.g. {', '.join(names[:3])}" if names else ""
        lines.append(f"  weight_decay={g['weight_decay']:g}{adapt}: {len(tensors)} tensors, "
                     f"{sum(t.numel() for t in tensors):,} params{example}")
    return "\n".join(lines)
