"""Baselines: torch.optim's AdamW, Adam, Adagrad and SGD (heavy ball / Nesterov), unchanged.

They go through the same factory and parameter groups as LAMB/LARS so that a comparison differs only
in the update rule (Nado et al. 2021 argue tuned baselines match LAMB/LARS; the comparison needs the
same footing). ``implementation``: ``"auto"`` uses torch's fused kernel where the device and dtype
support it and every parameter is dense (else foreach), ``"fused"`` demands it, ``"foreach"`` the
multi-tensor path. ``grad_clip_norm`` clips the global gradient norm in place before each step (a step
pre-hook, the same as calling ``torch.nn.utils.clip_grad_norm_`` in the loop).

Why "dense": with torch 2.14.1 the CPU fused kernels of all four update a parameter that is not dense
(a strided view such as ``Parameter(torch.randn(10, 5, 2)[..., 0])``) wrongly and silently: on
(w @ x + b)^2, AdamW's loss grows from 69 to 677 in 200 steps where foreach reaches 2e-8
(tests/test_optim_fused.py reproduces it for all four). Dense layouts other than the contiguous one (channels_last,
a transpose) are fine. So ``auto`` picks foreach when any parameter is not dense (and logs it once), and
``fused`` refuses such parameters. The rule is applied on every device, CUDA included.

Sharded parameters (DTensors, under FSDP2's ``fully_shard``): torch 2.14.1 has DTensor sharding rules for
the fused Adam and AdamW kernels only; fused Adagrad and SGD fail at their first step
(``aten._fused_sgd_.default does not have a sharding strategy``). So ``auto`` picks foreach for those two
on sharded parameters, and ``fused`` refuses them.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "fused", "foreach")
TORCH_BASELINES = (torch.optim.AdamW, torch.optim.Adam, torch.optim.Adagrad, torch.optim.SGD)
FUSED_ON_DTENSORS = (torch.optim.AdamW, torch.optim.Adam)  # the fused kernels DTensor can shard
_logged_not_dense = False


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill one block of memory without gaps or overlaps, in some order of its
    dimensions (contiguous, channels_last, a transpose, a permutation): the layouts the fused kernels
    handle. A strided slice has gaps; an expanded tensor overlaps."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _named_tensors(params: list) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of a list of tensors, (name, tensor) pairs or param groups."""
    out = []

    def add(items):
        for item in [items] if isinstance(items, torch.Tensor) else items:
            out.append(item if isinstance(item, tuple) else (f"param{len(out)}", item))

    for entry in params:
        add(entry["params"] if isinstance(entry, dict) else [entry])
    return out


def build(cls, params, *, lr, weight_decay, grad_clip_norm, implementation, **hyper) -> torch.optim.Optimizer:
    """``cls`` (one of :data:`TORCH_BASELINES`) on the path ``implementation`` chooses, with the pre-clip."""
    global _logged_not_dense
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation for torch baselines must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    params = list(params)
    kwargs = dict(lr=lr, weight_decay=weight_decay, **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in hyper.items()})

    def make(**path):  # torch writes its defaults into group dicts: give each try its own copies
        return cls([dict(p) if isinstance(p, dict) else p for p in params], **path, **kwargs)

    opt = None
    named = _named_tensors(params)
    sharded = any(isinstance(p, DTensor) for _, p in named)
    if sharded and cls not in FUSED_ON_DTENSORS:
        if implementation == "fused":
            raise ValueError(f"implementation='fused': torch has no fused {cls.__name__} for sharded (FSDP2 / "
                             "DTensor) parameters; use implementation='auto' or 'foreach'")
        implementation = "foreach"
    if implementation != "foreach":
        not_dense = [(n, p) for n, p in named if not is_dense(p)]
        if not_dense:
            shown = ", ".join(f"{n} (shape {tuple(p.shape)}, stride {p.stride()})" for n, p in not_dense[:3])
            if implementation == "fused":
                raise ValueError(
                    f"implementation='fused' needs dense parameters: torch's fused {cls.__name__} updates "
                    f"non-dense ones wrongly (checked on CPU, torch 2.14.1). Not dense: {shown}"
                    f"{' ...' if len(not_dense) > 3 else ''}. Use implementation='auto' or 'foreach', "
                    f"or make them contiguous.")
            if not _logged_not_dense:
                _logged_not_dense = True
                log.warning("largebatch.optim: %d parameter(s) not dense, e.g. %s: %s uses foreach, not the "
                            "fused kernel, which updates them wrongly (logged once)", len(not_dense), shown,
                            cls.__name__)
        else:
            try:
                opt = make(fused=True)
            except (RuntimeError, ValueError, TypeError):
                if implementation == "fused":
                    raise
    if opt is None:
        opt = make(foreach=True)
    if grad_clip_norm is not None:
        def clip(optimizer, args, kwargs):
            grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, grad_clip_norm, foreach=True)

        opt.register_step_pre_hook(clip)
        opt.grad_clip_norm = grad_clip_norm
    return opt
