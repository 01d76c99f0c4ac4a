"""The CUDA path of LAMB and LARS: a two-pass Triton kernel over every tensor of a step.

Why a kernel: a trust ratio needs the whole tensor's norms before its update, so a trust-ratio method
reads the tensors twice. Pass 1 reads x, g, m, v, writes m, v and each chunk's partial squared norms;
pass 2 reads x, m, v and writes x: ~40 bytes a float32 parameter against torch's fused AdamW's 28, so
~1.43x fused AdamW is the floor (apex's FusedLAMB does the same two stages). The foreach path instead
streams every tensor once per elementwise op (3.5-3.7x fused AdamW measured on an H200). Here ALL
tensors of a step go to two launches (two per parameter/gradient dtype pair): a chunk table maps each
program to a chunk of one tensor and a pointer table holds the tensors' addresses, as apex's
``multi_tensor_apply`` does. The kernels are :mod:`largebatch.optim._triton_kernels`; hyperparameters
travel in the C++ kernel's float64 table (one row per param group), so both kernels read the same
columns. Norms are summed per chunk, then per tensor in float64 in a fixed order: a step is bitwise
repeatable. Parameters and gradients may be float32, bfloat16 or float16; the state is float32.

Path choice (:func:`choose_path`, in front of ``_common.choose_path``): ``"auto"`` takes the kernel when
every tensor is a dense CUDA tensor of those dtypes and the kernel compiles (checked once per dtype pair
on a scratch step, so a failed build never leaves a real step half done; then one logged warning and
foreach); ``"triton"`` takes it or raises; CPU tensors keep the C++ kernel / foreach choice. Sharded
(FSDP2 DTensor) parameters never take the kernel: a DTensor's local tensor is one shard, while the trust
ratio needs the norm of the WHOLE tensor, which foreach's norms of DTensors reduce over the shards.

Without a GPU, ``TRITON_INTERPRET=1`` set before the first use runs the kernels in Triton's interpreter
on CPU tensors (``implementation="triton"`` only): that is how the tests check them against the float64
reference and the C++ kernel.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import NamedTuple

import torch

from . import _common

log = logging.getLogger(__name__)

IMPLEMENTATIONS = (*_common.IMPLEMENTATIONS, "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of params and grads; the state is float32
CHUNK = 1 << 16  # elements of one tensor per program
BLOCK = 1024  # elements per vector operation of a program
RBLOCK = 256  # chunk partials summed per vector operation in pass 2

_lock = threading.Lock()
_kernels = None
_failed: str | None = None
_probed: dict[tuple, str | None] = {}  # (kernel, x dtype, g dtype, device) -> None, or why it failed


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    return name


def interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``): the kernels then step CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load():
    """The kernel module (importing Triton), or None when Triton cannot be imported (see :func:`failure`)."""
    global _kernels, _failed
    with _lock:
        if _kernels is None and _failed is None:
            try:
                _kernels = importlib.import_module("largebatch.optim._triton_kernels")
            except Exception as exc:  # no triton, or a triton that cannot define the kernels
                _failed = f"{type(exc).__name__}: {exc}"
        return _kernels


def failure() -> str | None:
    """Why the kernels are unavailable in this process (None if they are, or were not tried)."""
    return _failed


def unfit(tensors: list[torch.Tensor]) -> str | None:
    """Why the kernel cannot step these tensors (params, grads, states), or None when it can."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"the tensors are on several devices ({sorted(map(str, devices))})"
    device = next(iter(devices))
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"it needs CUDA tensors, got {device.type} ones (TRITON_INTERPRET=1 runs it on CPU, for tests)"
    for t in tensors:
        if t.is_sparse or not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            return "it needs dense (contiguous or channels-last) tensors"
        if t.dtype not in DTYPES:
            return f"it steps float32/bfloat16/float16 tensors, got {t.dtype}"
    return None


def choose_path(requested: str, tensors: list[torch.Tensor], cpp_ok: bool = True) -> str:
    """'triton', 'cpp' or 'foreach' for one step of these tensors (see the module docstring).

    ``cpp_ok=False`` when a group uses a form the C++ kernel lacks (LARS's ``lr_in_momentum``)."""
    if requested == "foreach" or not tensors:
        return "foreach"
    if requested == "cpp" and not cpp_ok:
        raise ValueError("lr_in_momentum has no C++ kernel: use implementation='foreach', 'triton' or 'auto'")
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if requested == "cpp" or (requested == "auto" and on_cpu):
        return _common.choose_path(requested if cpp_ok else "foreach", tensors)
    if any(_common.is_sharded(t) for t in tensors):
        if requested == "triton":
            raise ValueError("implementation='triton' cannot step sharded (FSDP2 / DTensor) parameters: the kernel "
                             "sees one shard, not the whole tensor its trust ratio needs; use implementation="
                             "'auto' or 'foreach'")
        return "foreach"
    reason = unfit(tensors)
    if reason is not None:
        if requested == "triton":
            raise ValueError(f"implementation='triton' cannot step these tensors: {reason}")
        return "foreach"
    return "triton"


def available(kernel: str, x_dtype: torch.dtype, g_dtype: torch.dtype, device: torch.device) -> str | None:
    """None when the kernel pair for these dtypes builds and runs on ``device`` (checked once, on scratch
    tensors), else why not."""
    key = (kernel, x_dtype, g_dtype, str(device))
    if key not in _probed:
        if load() is None:
            _probed[key] = f"Triton is unavailable: {failure()}"
        else:
            try:
                _probe(kernel, x_dtype, g_dtype, device)
                _probed[key] = None
            except Exception as exc:  # a compiler or driver problem: report it, never crash training
                _probed[key] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                log.warning("largebatch.optim: the Triton %s kernel failed on %s: %s", kernel, device, _probed[key])
    return _probed[key]


def _probe(kernel: str, x_dtype, g_dtype, device) -> None:
    """Compile and run both passes on scratch tensors: a failure here leaves every real tensor untouched."""
    width = len(_row_of_kernel(kernel, None))
    x = torch.ones(4, dtype=x_dtype, device=device)
    g = torch.ones(4, dtype=g_dtype, device=device)
    states = [torch.zeros(4, device=device) for _ in range(2)]
    hp = torch.ones(1, width, dtype=torch.float64, device=device)  # adapted, every branch compiled, no 0/0
    layout = _Layout.build([x], [g], [states], [0], [True], device)
    _launch(kernel, layout, layout.pointers([x], [g], [states], device), hp, torch.ones(1, device=device),
            x_dtype, g_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row_of_kernel(kernel: str, row) -> tuple:
    """A group's float64 hp row as the kernel reads it (``row`` None: a row of zeros, for the width)."""
    width = (_kernels.LAMB_COLUMNS if kernel == "lamb_step" else _kernels.LARS_COLUMNS).value
    row = (0.0,) * width if row is None else tuple(float(v) for v in row)
    if len(row) != width:
        raise ValueError(f"a {kernel} row has {width} columns, got {len(row)}")
    return row


class _Layout(NamedTuple):
    """What depends only on the tensors' identities and sizes: built once, kept on the device."""

    n_tensors: int
    n_chunks: int  # pass 1 programs
    n_adapted_chunks: int  # pass 2 programs
    row_of: torch.Tensor  # per tensor: its hp row (param group)
    numels: torch.Tensor
    first_chunk: torch.Tensor  # per tensor: its first chunk in pass 1's numbering, and how many it has
    n_chunks_of: torch.Tensor
    chunk_tensor: torch.Tensor  # pass 1, per program: which tensor, from which element
    chunk_offset: torch.Tensor
    chunk_tensor2: torch.Tensor  # pass 2: the same, for the chunks of adapted tensors only
    chunk_offset2: torch.Tensor
    partials: torch.Tensor  # float32 [n_chunks, 2]: per chunk, the two squared norms
    adapted: torch.Tensor  # indices of the adapted tensors (their ratios are recorded)

    @staticmethod
    def build(xs, gs, states, row_of, adapts, device) -> _Layout:
        numels = [x.numel() for x in xs]
        first, count, c_tensor, c_offset, c_tensor2, c_offset2 = [], [], [], [], [], []
        for t, n in enumerate(numels):
            k = max(1, -(-n // CHUNK))  # an empty tensor still gets a chunk (it writes zero partials)
            first.append(len(c_tensor))
            count.append(k)
            c_tensor += [t] * k
            c_offset += [j * CHUNK for j in range(k)]
            if adapts[t]:
                c_tensor2 += [t] * k
                c_offset2 += [j * CHUNK for j in range(k)]
        adapted = [t for t, a in enumerate(adapts) if a]
        parts = [row_of, numels, first, count, c_tensor, c_offset, c_tensor2, c_offset2, adapted]
        packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64).to(device)
        views, at = [], 0
        for part in parts:
            views.append(packed[at:at + len(part)])
            at += len(part)
        partials = torch.empty(len(c_tensor), 2, dtype=torch.float32, device=device)
        return _Layout(len(xs), len(c_tensor), len(c_tensor2), *views[:8], partials, views[8])

    def pointers(self, xs, gs, states, device) -> torch.Tensor:
        """[n_tensors, 4] int64 addresses: param, grad, state 0, state 1 (0 where a tensor has fewer)."""
        table = []
        for x, g, s in zip(xs, gs, states):
            table += [x.data_ptr(), g.data_ptr(), *(t.data_ptr() for t in s), *([0] * (2 - len(s)))]
        return torch.tensor(table, dtype=torch.int64).to(device)


def _launch(kernel: str, layout: _Layout, ptrs, hp, grad_scale, x_dtype, g_dtype) -> torch.Tensor:
    """Both passes over every tensor of the layout; returns the per-tensor ratios (1 where not adapted)."""
    k = _kernels
    X, G = k.TL_DTYPES[x_dtype], k.TL_DTYPES[g_dtype]
    lamb = kernel == "lamb_step"
    ratios = torch.ones(layout.n_tensors, dtype=torch.float32, device=hp.device)
    where = (layout.row_of, layout.chunk_tensor, layout.chunk_offset, layout.numels)
    (k.lamb_pass1 if lamb else k.lars_pass1)[(layout.n_chunks,)](
        ptrs, hp, *where, grad_scale, layout.partials, X=X, G=G, CHUNK=CHUNK, BLOCK=BLOCK)
    if layout.n_adapted_chunks:
        where2 = (layout.row_of, layout.chunk_tensor2, layout.chunk_offset2, layout.numels, layout.first_chunk,
                  layout.n_chunks_of, layout.partials, ratios)
        if lamb:
            k.lamb_pass2[(layout.n_adapted_chunks,)](ptrs, hp, *where2, X=X, CHUNK=CHUNK, BLOCK=BLOCK, RBLOCK=RBLOCK)
        else:
            k.lars_pass2[(layout.n_adapted_chunks,)](ptrs, hp, *where2, grad_scale, X=X, G=G, CHUNK=CHUNK,
                                                     BLOCK=BLOCK, RBLOCK=RBLOCK)
    return ratios


def step(opt, batches, grad_scale: torch.Tensor | None) -> None:
    """One step of ``opt`` (a TrustRatioOptimizer; ``choose_path`` said 'triton') over its GroupBatches,
    recording the adapted tensors' ratios. Raises RuntimeError when the kernel is unavailable."""
    device = batches[0].params[0].device
    by_dtypes: dict[tuple, list] = {}  # (param dtype, grad dtype) -> [(param, grad, states, row, adapt)]
    for row, b in enumerate(batches):
        for i, (x, g) in enumerate(zip(b.params, b.grads)):
            entry = (x, g, [s[i] for s in b.states], row, bool(b.group["adapt"]))
            by_dtypes.setdefault((x.dtype, g.dtype), []).append(entry)
    for x_dtype, g_dtype in by_dtypes:  # before any tensor is touched
        reason = available(opt.kernel, x_dtype, g_dtype, device)
        if reason is not None:
            raise RuntimeError(f"the Triton {opt.kernel} kernel is unavailable for {x_dtype}/{g_dtype} on "
                               f"{device}: {reason}")
    hp = torch.tensor([_row_of_kernel(opt.kernel, opt._triton_row(b.group)) for b in batches],
                      dtype=torch.float64).to(device)
    scale = (torch.ones(1, device=device) if grad_scale is None
             else grad_scale.detach().reshape(1).to(device=device, dtype=torch.float32))
    adapted, ratios = [], []
    for (x_dtype, g_dtype), entries in by_dtypes.items():
        xs, gs, states, rows, adapts = (list(v) for v in zip(*entries))
        layout, ptrs = _cached_layout(opt, xs, gs, states, rows, adapts, device)
        r = _launch(opt.kernel, layout, ptrs, hp, scale, x_dtype, g_dtype)
        adapted += [x for x, a in zip(xs, adapts) if a]
        ratios.append(r[layout.adapted])
    _common.record_trust_ratios(opt, adapted, torch.cat(ratios) if adapted else None)


def _cached_layout(opt, xs, gs, states, rows, adapts, device) -> tuple[_Layout, torch.Tensor]:
    """The layout of these tensors (kept on the optimizer) and their pointer table, uploaded again only
    when an address changed (gradients set to None between steps usually come back at the same one)."""
    cache = opt.__dict__.setdefault("_triton_layouts", {})
    key = (tuple(map(id, xs)), tuple(x.numel() for x in xs), tuple(rows), tuple(adapts), xs[0].dtype, gs[0].dtype)
    addresses = [t.data_ptr() for x, g, s in zip(xs, gs, states) for t in (x, g, *s)]
    layout, known, ptrs = cache.get(key, (None, None, None))
    if layout is None:
        layout = _Layout.build(xs, gs, states, rows, adapts, device)
    if addresses != known:
        ptrs = layout.pointers(xs, gs, states, device)
    cache[key] = (layout, addresses, ptrs)
    return layout, ptrs
