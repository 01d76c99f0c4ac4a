"""The skeleton LAMB, LARS and the LAMB paper's LARS share: options, state, path choice, the step.

A subclass states its options in its ``__init__`` signature (None = the registry default), checks what
only it needs in :meth:`TrustRatioOptimizer._check`, names its per-tensor state (``_state_keys``, in the
kernel's argument order) and supplies the two ways to do one step:

- :meth:`_foreach_group`: one param group with ``torch._foreach_*`` ops (any device), returning the
  group's trust ratios (None when the group is not adapted);
- :meth:`_cpp_row`: the group's row of the C++ kernel's hyperparameter table (a ``_cpp.*Columns``),
  which the Triton kernel (:mod:`largebatch.optim._triton`) reads too.

Everything else is here: filling options from the registry (their one home), the checks every variant
needs, ``grad_clip_norm`` (a global option, kept in ``state_dict``), sparse-gradient refusal, lazy state
(float32 for bfloat16/float16 parameters: moments kept in 16 bits lose most of the update, and the
Triton kernel reads float32 state, as apex's FusedLAMB keeps it), NVLAMB's global pre-clip, the choice
between the Triton kernel (CUDA), the C++ kernel (CPU) and foreach, and the trust-ratio record that
:func:`largebatch.optim.trust_ratio_stats` reads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _common, _cpp, _triton


class GroupBatch(NamedTuple):
    """One param group's tensors that have a gradient this step."""

    group: dict
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: tuple[list[torch.Tensor], ...]  # per state key of the group, in the kernel's argument order


class TrustRatioOptimizer(torch.optim.Optimizer):
    """Base of the trust-ratio optimizers. Param-group key ``adapt`` (default True) turns the ratio on or
    off per group; tensors of an unadapted group take ratio 1."""

    registry_name: str  # the registry entry whose defaults fill options left at None
    kernel: str  # C++ step: kernel(params, grads, *state lists, hp table) -> ratios
    kernel_states: int  # how many state lists the kernel takes

    def __init__(self, params, lr: float, weight_decay: float, **options):
        options = self._registry_defaults(options)
        grad_clip_norm = options.pop("grad_clip_norm")
        implementation = options.pop("implementation")
        if lr < 0 or weight_decay < 0 or options.get("eps", 0.0) < 0:
            raise ValueError(f"lr, weight_decay and eps must be >= 0 (got {lr}, {weight_decay}, "
                             f"{options.get('eps')})")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")
        if options["clamp_weight_norm"] is not None and options["clamp_weight_norm"] <= 0:
            raise ValueError(f"clamp_weight_norm must be > 0 or None, got {options['clamp_weight_norm']}")
        _common.parse_trust_clip(options["trust_clip"])
        self._check(options)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **options, adapt=True))
        # Global options: the pre-clip needs the norm over ALL groups, the path is chosen for all at once.
        self.grad_clip_norm = grad_clip_norm
        self.implementation = _triton.check_implementation(implementation)
        self.last_path: str | None = None

    def _registry_defaults(self, options: dict) -> dict:
        from . import OPTIMIZERS  # the defaults' one home; imported late because it imports this module

        defaults = OPTIMIZERS[self.registry_name].defaults
        return {k: defaults[k] if v is None else v for k, v in options.items()}

    # ------------------------------------------------------------------ what a subclass supplies
    def _check(self, options: dict) -> None:
        """Checks (and normalises, in place) the options only this optimizer has."""

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """Per-tensor state of this group, zero-initialised on first use, in the kernel's argument order."""
        raise NotImplementedError

    def _begin_group_step(self, group: dict) -> None:
        """Called once per step for each group that has gradients, before the update."""

    def _foreach_group(self, batch: GroupBatch, grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def _cpp_row(self, group: dict, grad_scale: float) -> tuple:
        raise NotImplementedError

    def _cpp_supports(self) -> bool:
        """False when a group uses a form the C++ kernel lacks ('auto' then takes foreach on CPU)."""
        return True

    def _triton_row(self, group: dict) -> tuple:
        """The group's row of the Triton kernel's table: the C++ kernel's, with grad scale 1 (the kernel
        reads NVLAMB's pre-clip factor from the device, so the step never waits for it), and for LARS
        the ``lr_in_momentum`` flag."""
        row = tuple(self._cpp_row(group, 1.0))
        return row + (float(group.get("lr_in_momentum", False)),) if self.kernel == "lars_step" else row

    # ------------------------------------------------------------------ the shared step
    def state_dict(self):
        sd = super().state_dict()
        sd["grad_clip_norm"] = self.grad_clip_norm
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.grad_clip_norm = state_dict.pop("grad_clip_norm", self.grad_clip_norm)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():  # torch casts loaded state to the param's dtype: undo it
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point() and value.dtype != _state_dtype(p):
                    state[key] = value.to(_state_dtype(p))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self._gather()
        if not batches:
            return loss
        scale = _common.global_grad_scale([g for b in batches for g in b.grads], self.grad_clip_norm)
        tensors = [t for b in batches for lst in (b.params, b.grads, *b.states) for t in lst]
        self.last_path = self._choose_path(batches, tensors)
        if self.last_path == "triton":
            _triton.step(self, batches, scale)
        elif self.last_path == "cpp":
            self._step_cpp(batches, 1.0 if scale is None else float(scale))
        else:
            adapted, ratios = [], []
            for batch in batches:
                r = self._foreach_group(batch, scale)
                if r is not None:
                    adapted += batch.params
                    ratios.append(r)
            _common.record_trust_ratios(self, adapted, torch.cat(ratios) if ratios else None)
        return loss

    def _gather(self) -> list[GroupBatch]:
        batches = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            keys = self._state_keys(group)
            for p in ps:
                state = self.state[p]
                for key in keys:
                    if key not in state:
                        state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            self._begin_group_step(group)
            states = tuple([self.state[p][key] for p in ps] for key in keys)
            batches.append(GroupBatch(group, ps, [p.grad for p in ps], states))
        return batches

    def _choose_path(self, batches: list[GroupBatch], tensors: list[torch.Tensor]) -> str:
        """The path of this step; under 'auto', a Triton kernel that fails to build means foreach."""
        path = _triton.choose_path(self.implementation, tensors, cpp_ok=self._cpp_supports())
        if path == "triton" and self.implementation == "auto":
            pairs = {(x.dtype, g.dtype) for b in batches for x, g in zip(b.params, b.grads)}
            device = tensors[0].device
            reasons = [r for x, g in pairs if (r := _triton.available(self.kernel, x, g, device)) is not None]
            if reasons:
                _common._warn_once(f"largebatch.optim: Triton kernel unavailable ({reasons[0].splitlines()[0]}), "
                                   "falling back to the foreach implementation")
                return "foreach"
        return path

    def _step_cpp(self, batches: list[GroupBatch], grad_scale: float) -> None:
        rows, xs, gs, adapt_mask = [], [], [], []
        states: list[list[torch.Tensor]] = [[] for _ in range(self.kernel_states)]
        empty = torch.empty(0)
        for batch in batches:
            n = len(batch.params)
            rows += [self._cpp_row(batch.group, grad_scale)] * n
            adapt_mask += [bool(batch.group["adapt"])] * n
            xs += batch.params
            gs += batch.grads
            for i, lst in enumerate(states):  # a group without some state (LARS, momentum 0): empty tensors
                lst += batch.states[i] if i < len(batch.states) else [empty] * n
        ratios = getattr(_cpp.load(), self.kernel)(xs, gs, *states, _cpp.table(rows))
        adapted = [p for p, a in zip(xs, adapt_mask) if a]
        _common.record_trust_ratios(self, adapted, ratios[torch.tensor(adapt_mask)] if adapted else None)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 state for 16-bit floating parameters, the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def as_float32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """16-bit tensors as float32 copies, others as they are: the foreach paths form the updates of 16-bit
    parameters in float32, against float32 state, as the kernels do (norms of 16-bit tensors accumulate
    in float32 in :func:`largebatch.optim._common.foreach_norms` without a copy)."""
    return [t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in tensors]
