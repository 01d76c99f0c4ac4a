"""The Triton kernels of :mod:`largebatch.optim._triton` (imported only when that path is used, because
importing Triton costs ~1 s and because ``TRITON_INTERPRET=1`` must be read when the kernels are defined).

Every launch covers all tensors of a step: program ``c`` takes chunk ``c`` of the chunk table
(``chunk_tensor[c]``: which tensor, ``chunk_offset[c]``: its first element) and finds the tensor's raw
addresses in a pointer table (row ``t``: param, grad, state 0, state 1; 0 where absent) and its
hyperparameters in the float64 table of the C++ kernel (``hp[row_of[t]]``, the columns of
``_cpp.LambColumns`` / ``_cpp.LarsColumns``; LARS adds ``lr_in_momentum``).

Pass 1 updates the moments (LAMB, the LAMB paper's LARS) and writes each chunk's partial sums of the two
squared norms; pass 2 sums a tensor's partials in float64, in a fixed order (the same in every program
of the tensor: no atomics, so a run is bitwise repeatable), forms the trust ratio and applies the update.
Unadapted tensors (ratio 1) are finished in pass 1. Elementwise math is float32 with IEEE division and
square root (``div_rn``, ``sqrt_rn``), as torch's foreach ops; params and grads are read in their dtype
(fp32, bf16, fp16) and the state is float32.
"""

import torch
import triton
import triton.language as tl

from ._cpp import LambColumns, LarsColumns


def _col(columns, name):
    return tl.constexpr(columns._fields.index(name))


# Column numbers, from the field order the C++ kernel shares (one home for both kernels).
L_LR, L_WD, L_B1, L_B2 = (_col(LambColumns, n) for n in ("lr", "wd", "b1", "b2"))
L_C1, L_C2 = _col(LambColumns, "one_minus_b1"), _col(LambColumns, "one_minus_b2")
L_IBC1, L_ISBC2, L_EPS = _col(LambColumns, "inv_bc1"), _col(LambColumns, "inv_sqrt_bc2"), _col(LambColumns, "eps")
L_GS, L_CLAMP, L_LO, L_HI, L_ADAPT = (_col(LambColumns, n)
                                      for n in ("grad_scale", "clamp_w", "clip_lo", "clip_hi", "adapt"))
R_LR, R_WD, R_MOM, R_NEST, R_ETA, R_EPS = (_col(LarsColumns, n) for n in (
    "lr", "wd", "momentum", "nesterov", "trust_coefficient", "eps"))
R_GS, R_CLAMP, R_LO, R_HI, R_ADAPT, R_MODE, R_C1 = (_col(LarsColumns, n) for n in (
    "grad_scale", "clamp_w", "clip_lo", "clip_hi", "adapt", "mode", "one_minus_momentum"))
R_LR_INSIDE = tl.constexpr(len(LarsColumns._fields))  # the column the Triton path appends
LARS_COLUMNS = tl.constexpr(len(LarsColumns._fields) + 1)
LAMB_COLUMNS = tl.constexpr(len(LambColumns._fields))


# The kernels use Triton's builtins only (tl.full and tl.reduce, not the library's tl.zeros and tl.sum):
# the interpreter cannot run library functions that were defined before TRITON_INTERPRET was set, which is
# the case whenever torch imported Triton first.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _where_chunk(chunk_tensor, chunk_offset, numels, c, CHUNK: tl.constexpr):
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_offset + c)
    end = tl.minimum(start + CHUNK, tl.load(numels + t))
    return t, start, end


@triton.jit
def _this_chunk(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, COLUMNS: tl.constexpr, CHUNK: tl.constexpr,
                X: tl.constexpr):
    """The program's chunk: (its index, its tensor, the chunk's [start, end), the tensor's parameter pointer and
    its row of hyperparameters)."""
    c = tl.program_id(0)
    t, start, end = _where_chunk(chunk_tensor, chunk_offset, numels, c, CHUNK)
    return c, t, start, end, _tensor_ptr(ptrs, t, 0, X), hp + tl.load(row_of + t) * COLUMNS


@triton.jit
def _clipped_ratio(ratio, h, LO: tl.constexpr, HI: tl.constexpr, LR: tl.constexpr, start, ratios, t):
    """(the trust ratio clipped to the row's [LO, HI] columns, the row's lr); the tensor's first chunk records
    the ratio for the optimizer's logs."""
    ratio = _clip(ratio, tl.load(h + LO), tl.load(h + HI)).to(tl.float32)
    if start == 0:
        tl.store(ratios + t, ratio)
    return ratio, tl.load(h + LR).to(tl.float32)


@triton.jit
def _tensor_ptr(ptrs, t, k: tl.constexpr, DTYPE: tl.constexpr):
    """Tensor ``t``'s ``k``-th pointer (0 parameter, 1 gradient, 2-3 optimizer state) as a ``DTYPE`` pointer."""
    return tl.load(ptrs + 4 * t + k).to(tl.pointer_type(DTYPE))


@triton.jit
def _tensor_norms(partials, first_chunk, n_chunks, t, RBLOCK: tl.constexpr):
    """||a||, ||b|| of tensor t from its chunks' partial sums of squares, in float64, in a fixed order."""
    first = tl.load(first_chunk + t)
    count = tl.load(n_chunks + t)
    sa = tl.full([RBLOCK], 0.0, tl.float64)
    sb = tl.full([RBLOCK], 0.0, tl.float64)
    for j in range(0, count, RBLOCK):
        k = j + tl.arange(0, RBLOCK)
        ok = k < count
        sa += tl.load(partials + 2 * (first + k), mask=ok, other=0.0).to(tl.float64)
        sb += tl.load(partials + 2 * (first + k) + 1, mask=ok, other=0.0).to(tl.float64)
    return tl.sqrt(tl.reduce(sa, 0, _add)), tl.sqrt(tl.reduce(sb, 0, _add))  # float64: IEEE-rounded


@triton.jit
def _clip(r, lo, hi):
    return tl.minimum(tl.maximum(r, lo), hi)


# ---------------------------------------------------------------------------------------------- LAMB
@triton.jit
def _adam_direction(m, v, x, h):
    """u = m_hat / (sqrt(v_hat) + eps) + wd*x, in foreach's order of operations."""
    denom = tl.sqrt_rn(v) * tl.load(h + L_ISBC2).to(tl.float32) + tl.load(h + L_EPS).to(tl.float32)
    return tl.div_rn(m, denom) * tl.load(h + L_IBC1).to(tl.float32) + tl.load(h + L_WD).to(tl.float32) * x


@triton.jit
def lamb_pass1(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, grad_scale, partials,
               X: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, end, x_ptr, h = _this_chunk(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, LAMB_COLUMNS, CHUNK, X)
    g_ptr, m_ptr, v_ptr = _tensor_ptr(ptrs, t, 1, G), _tensor_ptr(ptrs, t, 2, tl.float32), _tensor_ptr(ptrs, t, 3, tl.float32)
    gs = tl.load(grad_scale) * tl.load(h + L_GS).to(tl.float32)
    b1, b2 = tl.load(h + L_B1).to(tl.float32), tl.load(h + L_B2).to(tl.float32)
    c1, c2 = tl.load(h + L_C1).to(tl.float32), tl.load(h + L_C2).to(tl.float32)
    adapt = tl.load(h + L_ADAPT) != 0
    lr = tl.load(h + L_LR).to(tl.float32)
    acc_x = tl.full([BLOCK], 0.0, tl.float32)
    acc_u = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK)
        ok = i < end
        g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32) * gs
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        m = b1 * tl.load(m_ptr + i, mask=ok, other=0.0) + c1 * g
        v = b2 * tl.load(v_ptr + i, mask=ok, other=0.0) + c2 * g * g
        tl.store(m_ptr + i, m, mask=ok)
        tl.store(v_ptr + i, v, mask=ok)
        u = _adam_direction(m, v, x, h)
        if adapt:
            acc_x += x * x
            acc_u += u * u
        else:  # ratio 1: the whole AdamW step, here
            tl.store(x_ptr + i, (x - lr * u).to(X), mask=ok)
    tl.store(partials + 2 * c, tl.reduce(acc_x, 0, _add))
    tl.store(partials + 2 * c + 1, tl.reduce(acc_u, 0, _add))


@triton.jit
def lamb_pass2(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, first_chunk, n_chunks, partials, ratios,
               X: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    c, t, start, end, x_ptr, h = _this_chunk(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, LAMB_COLUMNS, CHUNK, X)
    m_ptr, v_ptr = _tensor_ptr(ptrs, t, 2, tl.float32), _tensor_ptr(ptrs, t, 3, tl.float32)
    xn, un = _tensor_norms(partials, first_chunk, n_chunks, t, RBLOCK)
    xn = tl.minimum(xn, tl.load(h + L_CLAMP))
    ratio = tl.where((xn > 0) & (un > 0), xn / tl.where(un > 0, un, 1.0), 1.0)
    ratio, lr = _clipped_ratio(ratio, h, L_LO, L_HI, L_LR, start, ratios, t)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK)
        ok = i < end
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        u = _adam_direction(tl.load(m_ptr + i, mask=ok, other=0.0), tl.load(v_ptr + i, mask=ok, other=0.0), x, h)
        tl.store(x_ptr + i, (x - lr * (ratio * u)).to(X), mask=ok)


# ---------------------------------------------------------------------------------------------- LARS
@triton.jit
def _lars_apply(x_ptr, g_ptr, b_ptr, i, ok, x, gs, ratio, h, X: tl.constexpr):
    """Modes lars/larc: u = ratio*(g + wd*x) (times lr when lr_in_momentum); b = mom*b + u; x -= step."""
    mom = tl.load(h + R_MOM).to(tl.float32)
    lr = tl.load(h + R_LR).to(tl.float32)
    inside = tl.load(h + R_LR_INSIDE) != 0
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32) * gs
    u = ratio * (g + tl.load(h + R_WD).to(tl.float32) * x)
    if inside:
        u = u * lr
    step = u
    if mom != 0:
        b = mom * tl.load(b_ptr + i, mask=ok, other=0.0) + u
        tl.store(b_ptr + i, b, mask=ok)
        if tl.load(h + R_NEST) != 0:
            step = u + mom * b
        else:
            step = b
    if inside:
        x = x - step
    else:
        x = x - lr * step
    tl.store(x_ptr + i, x.to(X), mask=ok)


@triton.jit
def lars_pass1(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, grad_scale, partials,
               X: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c, t, start, end, x_ptr, h = _this_chunk(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, LARS_COLUMNS, CHUNK, X)
    g_ptr, b_ptr = _tensor_ptr(ptrs, t, 1, G), _tensor_ptr(ptrs, t, 2, tl.float32)
    gs = tl.load(grad_scale) * tl.load(h + R_GS).to(tl.float32)
    adapt = tl.load(h + R_ADAPT) != 0
    paper = tl.load(h + R_MODE) == 2  # the LAMB paper's LARS: the ratio normalises the dampened momentum
    mom, c1 = tl.load(h + R_MOM).to(tl.float32), tl.load(h + R_C1).to(tl.float32)
    wd, lr = tl.load(h + R_WD).to(tl.float32), tl.load(h + R_LR).to(tl.float32)
    acc_x = tl.full([BLOCK], 0.0, tl.float32)
    acc_y = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK)
        ok = i < end
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        if paper:
            g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32) * gs
            m = mom * tl.load(b_ptr + i, mask=ok, other=0.0) + c1 * (g + wd * x)
            tl.store(b_ptr + i, m, mask=ok)
            if adapt:
                acc_x += x * x
                acc_y += m * m
            else:
                tl.store(x_ptr + i, (x - lr * m).to(X), mask=ok)
        else:
            if adapt:
                g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32) * gs
                acc_x += x * x
                acc_y += g * g
            else:
                _lars_apply(x_ptr, g_ptr, b_ptr, i, ok, x, gs, 1.0, h, X)
    tl.store(partials + 2 * c, tl.reduce(acc_x, 0, _add))
    tl.store(partials + 2 * c + 1, tl.reduce(acc_y, 0, _add))


@triton.jit
def lars_pass2(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, first_chunk, n_chunks, partials, ratios,
               grad_scale, X: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
               RBLOCK: tl.constexpr):
    c, t, start, end, x_ptr, h = _this_chunk(ptrs, hp, row_of, chunk_tensor, chunk_offset, numels, LARS_COLUMNS, CHUNK, X)
    g_ptr, b_ptr = _tensor_ptr(ptrs, t, 1, G), _tensor_ptr(ptrs, t, 2, tl.float32)
    gs = tl.load(grad_scale) * tl.load(h + R_GS).to(tl.float32)
    paper = tl.load(h + R_MODE) == 2
    xn, yn = _tensor_norms(partials, first_chunk, n_chunks, t, RBLOCK)
    xn = tl.minimum(xn, tl.load(h + R_CLAMP))
    eta = tl.load(h + R_ETA)
    if paper:
        nonzero = (xn > 0) & (yn > 0)
        ratio = tl.where(nonzero, eta * xn / tl.where(nonzero, yn, 1.0), 1.0)
    else:
        den = yn + tl.load(h + R_WD) * xn  # eps only guards the division, not the zero rule
        nonzero = (xn > 0) & (den > 0)
        ratio = eta * xn / (den + tl.load(h + R_EPS))
        if tl.load(h + R_MODE) == 1:  # LARC: the clip applies to local_lr / lr
            ratio = ratio / tl.load(h + R_LR)
        ratio = tl.where(nonzero, ratio, 1.0)
    ratio, lr = _clipped_ratio(ratio, h, R_LO, R_HI, R_LR, start, ratios, t)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK)
        ok = i < end
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        if paper:
            tl.store(x_ptr + i, (x - lr * (ratio * tl.load(b_ptr + i, mask=ok, other=0.0))).to(X), mask=ok)
        else:
            _lars_apply(x_ptr, g_ptr, b_ptr, i, ok, x, gs, ratio, h, X)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
