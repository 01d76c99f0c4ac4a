"""CPU kernels for LAMB and LARS, built once with ``torch.utils.cpp_extension.load_inline``.

Why a kernel: on CPU an optimizer step over BERT-base is bound by memory bandwidth. The multi-tensor
(``torch._foreach_*``) path streams every tensor through memory once per elementwise op; this kernel
touches each element twice (pass 1: moments + the two norms, pass 2: the update), which is the floor for
a trust-ratio method. All tensors go to ONE call. Threads take whole tensors from a queue (biggest
first) and do both passes alone, so there is no barrier per tensor: on a shared, oversubscribed machine a
descheduled thread no longer stalls the others. Only a tensor bigger than one thread's share of the work
is split across threads. Norms are summed per fixed 32k-element block, then in block order, so results do
not depend on the thread count. Pass 2 walks the blocks in reverse so that the tail pass 1 just touched
is still in cache. Hyperparameters travel as a float64 table, one row per tensor, built from the named
columns of :class:`LambColumns` / :class:`LarsColumns`.

The build happens on the first CPU step (or :func:`load`), never at import; it takes ~20 s once and is
cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``). If it fails, :func:`load` returns
None and callers fall back to the foreach path with a logged warning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace {
constexpr int64_t kBlock = 1 << 15;   // reduction block: fixed, so sums are thread-count independent
constexpr int64_t kInner = 1024;      // float accumulation run before adding into a double
constexpr int64_t kSmall = 1 << 16;   // below this much work in all, no threads are started
constexpr int64_t kLambColumns = 14;  // width of lamb_step's hp table (_cpp.LambColumns)
constexpr int64_t kLarsColumns = 13;  // width of lars_step's hp table (_cpp.LarsColumns)

// Ratio := 1 when either norm is 0 (LAMB paper; timm; apex), then clipped to [lo, hi].
inline float clip_ratio(double num, double den, double lo, double hi) {
  double r = (num > 0.0 && den > 0.0) ? num / den : 1.0;
  return (float)std::min(std::max(r, lo), hi);
}

// ---------------------------------------------------------------- LAMB
// One row of the hp table per tensor; lamb_hp() below fixes the column order, which the Python side
// writes from _cpp.LambColumns (same field names; tests check the pair through lamb_columns()).
// (1-b computed in double by the caller: 1-0.999f in float is off by 1e-5 relative)
struct LambHp {
  float lr, wd, b1, b2, one_minus_b1, one_minus_b2, inv_bc1, inv_sqrt_bc2, eps, grad_scale;
  double clamp_w, clip_lo, clip_hi;
  bool adapt;
};

inline void lamb_pass1(float* __restrict x, const float* __restrict g, float* __restrict m, float* __restrict v,
                       int64_t b, int64_t e, const LambHp& h, double& sx, double& su) {
  const float c1 = h.one_minus_b1, c2 = h.one_minus_b2, b1 = h.b1, b2 = h.b2, gs = h.grad_scale;
  const float ib1 = h.inv_bc1, isb2 = h.inv_sqrt_bc2, eps = h.eps, wd = h.wd;
  for (int64_t s = b; s < e; s += kInner) {
    const int64_t t = std::min(s + kInner, e);
    float ax = 0.f, au = 0.f;
#pragma omp simd reduction(+ : ax, au)
    for (int64_t i = s; i < t; ++i) {
      const float gi = g[i] * gs;
      const float mi = b1 * m[i] + c1 * gi;
      const float vi = b2 * v[i] + c2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float u = mi * ib1 / (std::sqrt(vi) * isb2 + eps) + wd * x[i];
      ax += x[i] * x[i];
      au += u * u;
    }
    sx += ax;
    su += au;
  }
}

inline void lamb_pass2(float* __restrict x, const float* __restrict m, const float* __restrict v, int64_t b,
                       int64_t e, const LambHp& h, float step) {
  const float ib1 = h.inv_bc1, isb2 = h.inv_sqrt_bc2, eps = h.eps, wd = h.wd;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const float u = m[i] * ib1 / (std::sqrt(v[i]) * isb2 + eps) + wd * x[i];
    x[i] -= step * u;
  }
}

// Unadapted tensors: one fused pass, exactly Adam with decoupled decay inside the update.
inline void lamb_plain(float* x, const float* g, float* m, float* v, int64_t b, int64_t e, const LambHp& h) {
  const float c1 = h.one_minus_b1, c2 = h.one_minus_b2;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const float gi = g[i] * h.grad_scale;
    const float mi = h.b1 * m[i] + c1 * gi;
    const float vi = h.b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    x[i] -= h.lr * (mi * h.inv_bc1 / (std::sqrt(vi) * h.inv_sqrt_bc2 + h.eps) + h.wd * x[i]);
  }
}

LambHp lamb_hp(const at::TensorAccessor<double, 2>& a, int64_t k) {
  return LambHp{(float)a[k][0], (float)a[k][1], (float)a[k][2], (float)a[k][3], (float)a[k][4],
                (float)a[k][5], (float)a[k][6], (float)a[k][7], (float)a[k][8], (float)a[k][9],
                a[k][10], a[k][11], a[k][12], a[k][13] != 0.0};
}

float lamb_ratio(double sx, double su, const LambHp& h) {
  return clip_ratio(std::min(std::sqrt(sx), h.clamp_w), std::sqrt(su), h.clip_lo, h.clip_hi);
}

// ---------------------------------------------------------------- LARS
// Column order: lars_hp() below; the Python side writes it from _cpp.LarsColumns (same field names).
// mode (_cpp.LARS_MODES) 0: LARS 2017 (ratio on g + wd*x before momentum), 1: LARC (ratio/lr clipped),
// 2: lars_paper, the LAMB paper's Alg. 1 (ratio on the dampened momentum)
struct LarsHp {
  float lr, wd, momentum, trust_coefficient, eps, grad_scale;
  double clamp_w, clip_lo, clip_hi;
  bool nesterov, adapt;
  int mode;
  float one_minus_momentum;
};

LarsHp lars_hp(const at::TensorAccessor<double, 2>& a, int64_t k) {
  return LarsHp{(float)a[k][0], (float)a[k][1], (float)a[k][2], (float)a[k][4], (float)a[k][5],
                (float)a[k][6], a[k][7], a[k][8], a[k][9], a[k][3] != 0.0, a[k][10] != 0.0, (int)a[k][11],
                (float)a[k][12]};
}

// pass 1: mode 0/1 reads x, g -> ||x||^2, ||g||^2; mode 2 also updates m -> ||x||^2, ||m||^2.
inline void lars_pass1(const float* __restrict x, const float* __restrict g, float* __restrict buf, int64_t b,
                       int64_t e, const LarsHp& h, double& sx, double& sy) {
  const float c1 = h.one_minus_momentum, mom = h.momentum, gs = h.grad_scale, wd = h.wd;
  for (int64_t s = b; s < e; s += kInner) {
    const int64_t t = std::min(s + kInner, e);
    float ax = 0.f, ay = 0.f;
    if (h.mode == 2) {
#pragma omp simd reduction(+ : ax, ay)
      for (int64_t i = s; i < t; ++i) {
        const float mi = mom * buf[i] + c1 * (g[i] * gs + wd * x[i]);
        buf[i] = mi;
        ax += x[i] * x[i];
        ay += mi * mi;
      }
    } else {
#pragma omp simd reduction(+ : ax, ay)
      for (int64_t i = s; i < t; ++i) {
        const float gi = g[i] * gs;
        ax += x[i] * x[i];
        ay += gi * gi;
      }
    }
    sx += ax;
    sy += ay;
  }
}

// pass 2: mode 0/1: u = ratio*(g + wd*x); buf = mom*buf + u; x -= lr*(nesterov ? u + mom*buf : buf)
//         mode 2:   x -= lr*ratio*m
// Hyperparameters are copied to locals and pointers marked __restrict: otherwise every store to x/buf
// may alias the struct and forces a reload per vector.
inline void lars_pass2(float* __restrict x, const float* __restrict g, float* __restrict buf, int64_t b, int64_t e,
                       const LarsHp& h, float ratio) {
  const float lr = h.lr, mom = h.momentum, wd = h.wd, gs = h.grad_scale;
  if (h.mode == 2) {
    const float step = lr * ratio;
#pragma omp simd
    for (int64_t i = b; i < e; ++i) x[i] -= step * buf[i];
  } else if (mom == 0.f) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) x[i] -= lr * (ratio * (g[i] * gs + wd * x[i]));
  } else if (h.nesterov) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const float u = ratio * (g[i] * gs + wd * x[i]);
      const float bi = mom * buf[i] + u;
      buf[i] = bi;
      x[i] -= lr * (u + mom * bi);
    }
  } else {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const float bi = mom * buf[i] + ratio * (g[i] * gs + wd * x[i]);
      buf[i] = bi;
      x[i] -= lr * bi;
    }
  }
}

float lars_ratio(double sx, double sy, const LarsHp& h) {
  const double xn = std::min(std::sqrt(sx), h.clamp_w), yn = std::sqrt(sy);
  if (h.mode == 2) return clip_ratio(h.trust_coefficient * xn, yn, h.clip_lo, h.clip_hi);
  const double den = yn + h.wd * xn;  // eps only guards the division, not the zero rule
  if (!(xn > 0.0 && den > 0.0)) return (float)std::min(std::max(1.0, h.clip_lo), h.clip_hi);
  double r = h.trust_coefficient * xn / (den + h.eps);
  if (h.mode == 1) r /= h.lr;  // LARC: the clip applies to local_lr / lr
  return (float)std::min(std::max(r, h.clip_lo), h.clip_hi);
}

float* fptr(const torch::Tensor& t) { return t.data_ptr<float>(); }

// Generic driver. Whole tensors are handed out to threads from a queue, biggest first: each thread
// does both passes of its tensor with no synchronisation, so one descheduled thread (a busy machine)
// never stalls the others at a barrier. Only tensors bigger than one thread's share of the total work
// are split into blocks across threads (two parallel regions each). Norms are always summed per
// 32k-element block and then in block order, so results do not depend on the thread count or split.
template <class Hp, class MakeHp, class Pass1, class Pass2, class Plain, class Ratio>
torch::Tensor run(int64_t n, const torch::Tensor& hp, MakeHp make_hp, Pass1 pass1, Pass2 pass2, Plain plain,
                  Ratio ratio_of, const std::vector<torch::Tensor>& xs) {
  TORCH_CHECK(hp.dtype() == torch::kFloat64 && hp.dim() == 2 && hp.size(0) == n, "bad hp table");
  auto hpa = hp.accessor<double, 2>();
  auto ratios = torch::ones({n}, torch::kFloat32);
  float* rp = ratios.data_ptr<float>();
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) total += xs[k].numel();
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = std::max<int64_t>(kSmall, total / nth);
  std::vector<int64_t> whole, split;
  for (int64_t k = 0; k < n; ++k) (xs[k].numel() > share ? split : whole).push_back(k);
  std::stable_sort(whole.begin(), whole.end(), [&](int64_t a, int64_t b) { return xs[a].numel() > xs[b].numel(); });

  auto do_whole = [&](int64_t k) {
    const Hp h = make_hp(hpa, k);
    const int64_t ne = xs[k].numel(), nb = (ne + kBlock - 1) / kBlock;
    if (!h.adapt) { plain(k, 0, ne, h); return; }
    double s1 = 0.0, s2 = 0.0;
    for (int64_t blk = 0; blk < nb; ++blk) {
      double b1 = 0.0, b2 = 0.0;
      pass1(k, blk * kBlock, std::min((blk + 1) * kBlock, ne), h, b1, b2);
      s1 += b1;
      s2 += b2;
    }
    const float r = rp[k] = ratio_of(s1, s2, h);
    for (int64_t blk = nb - 1; blk >= 0; --blk)  // reverse: the tail of pass 1 is still cached
      pass2(k, blk * kBlock, std::min((blk + 1) * kBlock, ne), h, r);
  };
  if (nth == 1 || total < kSmall) {
    for (int64_t k : whole) do_whole(k);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
      for (int64_t j = next++; j < (int64_t)whole.size(); j = next++) do_whole(whole[j]);
    });
  }
  for (int64_t k : split) {
    const Hp h = make_hp(hpa, k);
    const int64_t ne = xs[k].numel(), nb = (ne + kBlock - 1) / kBlock;
    if (!h.adapt) {
      at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
        plain(k, b * kBlock, std::min(e * kBlock, ne), h);
      });
      continue;
    }
    std::vector<double> p1(nb, 0.0), p2(nb, 0.0);
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk)
        pass1(k, blk * kBlock, std::min((blk + 1) * kBlock, ne), h, p1[blk], p2[blk]);
    });
    double s1 = 0.0, s2 = 0.0;
    for (int64_t blk = 0; blk < nb; ++blk) { s1 += p1[blk]; s2 += p2[blk]; }
    const float r = rp[k] = ratio_of(s1, s2, h);
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = e - 1; blk >= b; --blk)
        pass2(k, blk * kBlock, std::min((blk + 1) * kBlock, ne), h, r);
    });
  }
  return ratios;
}

void check(const std::vector<torch::Tensor>& ts, const std::vector<torch::Tensor>& xs, const char* what) {
  TORCH_CHECK(ts.size() == xs.size(), what, ": list length mismatch");
  for (size_t k = 0; k < ts.size(); ++k) {
    TORCH_CHECK(ts[k].device().is_cpu() && ts[k].scalar_type() == torch::kFloat32 && ts[k].is_contiguous() &&
                    ts[k].numel() == xs[k].numel(),
                what, ": expected contiguous float32 CPU tensors shaped like the params");
  }
}

void check_hp(const torch::Tensor& hp, int64_t columns, const char* what) {
  TORCH_CHECK(hp.dtype() == torch::kFloat64 && hp.dim() == 2 && hp.size(1) == columns, what,
              ": the hp table must be float64 with ", columns, " columns");
}
}  // namespace

torch::Tensor lamb_step(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> gs,
                        std::vector<torch::Tensor> ms, std::vector<torch::Tensor> vs, torch::Tensor hp) {
  check(xs, xs, "params"); check(gs, xs, "grads"); check(ms, xs, "exp_avg"); check(vs, xs, "exp_avg_sq");
  check_hp(hp, kLambColumns, "lamb_step");
  auto p1 = [&](int64_t k, int64_t b, int64_t e, const LambHp& h, double& s1, double& s2) {
    lamb_pass1(fptr(xs[k]), fptr(gs[k]), fptr(ms[k]), fptr(vs[k]), b, e, h, s1, s2);
  };
  auto p2 = [&](int64_t k, int64_t b, int64_t e, const LambHp& h, float r) {
    lamb_pass2(fptr(xs[k]), fptr(ms[k]), fptr(vs[k]), b, e, h, h.lr * r);
  };
  auto plain = [&](int64_t k, int64_t b, int64_t e, const LambHp& h) {
    lamb_plain(fptr(xs[k]), fptr(gs[k]), fptr(ms[k]), fptr(vs[k]), b, e, h);
  };
  return run<LambHp>((int64_t)xs.size(), hp, lamb_hp, p1, p2, plain, lamb_ratio, xs);
}

// bufs may be empty tensors for momentum 0 (modes 0/1 only).
torch::Tensor lars_step(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> gs,
                        std::vector<torch::Tensor> bufs, torch::Tensor hp) {
  check(xs, xs, "params"); check(gs, xs, "grads"); check_hp(hp, kLarsColumns, "lars_step");
  TORCH_CHECK(bufs.size() == xs.size(), "momentum buffers: list length mismatch");
  auto bp = [&](int64_t k) { return bufs[k].numel() ? fptr(bufs[k]) : nullptr; };
  auto p1 = [&](int64_t k, int64_t b, int64_t e, const LarsHp& h, double& s1, double& s2) {
    lars_pass1(fptr(xs[k]), fptr(gs[k]), bp(k), b, e, h, s1, s2);
  };
  auto p2 = [&](int64_t k, int64_t b, int64_t e, const LarsHp& h, float r) {
    lars_pass2(fptr(xs[k]), fptr(gs[k]), bp(k), b, e, h, r);
  };
  // Unadapted tensors: ratio 1; mode 2 still needs its momentum update first (pass 1).
  auto plain = [&](int64_t k, int64_t b, int64_t e, const LarsHp& h) {
    if (h.mode == 2) { double s1 = 0.0, s2 = 0.0; lars_pass1(fptr(xs[k]), fptr(gs[k]), bp(k), b, e, h, s1, s2); }
    lars_pass2(fptr(xs[k]), fptr(gs[k]), bp(k), b, e, h, 1.f);
  };
  return run<LarsHp>((int64_t)xs.size(), hp, lars_hp, p1, p2, plain, lars_ratio, xs);
}

// What the kernels read from row k of an hp table, keyed by the struct's own field names (the names
// _cpp.LambColumns / _cpp.LarsColumns use): the test that the Python column order is the kernel's.
#define LB_FIELD(f) {#f, (double)h.f}
std::map<std::string, double> lamb_columns(torch::Tensor hp, int64_t k) {
  check_hp(hp, kLambColumns, "lamb_columns");
  TORCH_CHECK(0 <= k && k < hp.size(0), "lamb_columns: no row ", k);
  const LambHp h = lamb_hp(hp.accessor<double, 2>(), k);
  return {LB_FIELD(lr), LB_FIELD(wd), LB_FIELD(b1), LB_FIELD(b2), LB_FIELD(one_minus_b1),
          LB_FIELD(one_minus_b2), LB_FIELD(inv_bc1), LB_FIELD(inv_sqrt_bc2), LB_FIELD(eps),
          LB_FIELD(grad_scale), LB_FIELD(clamp_w), LB_FIELD(clip_lo), LB_FIELD(clip_hi), LB_FIELD(adapt)};
}

std::map<std::string, double> lars_columns(torch::Tensor hp, int64_t k) {
  check_hp(hp, kLarsColumns, "lars_columns");
  TORCH_CHECK(0 <= k && k < hp.size(0), "lars_columns: no row ", k);
  const LarsHp h = lars_hp(hp.accessor<double, 2>(), k);
  return {LB_FIELD(lr), LB_FIELD(wd), LB_FIELD(momentum), LB_FIELD(trust_coefficient), LB_FIELD(eps),
          LB_FIELD(grad_scale), LB_FIELD(clamp_w), LB_FIELD(clip_lo), LB_FIELD(clip_hi), LB_FIELD(nesterov),
          LB_FIELD(adapt), LB_FIELD(mode), LB_FIELD(one_minus_momentum)};
}
#undef LB_FIELD
"""



class LambColumns(NamedTuple):
    """One row of ``lamb_step``'s hyperparameter table. The field order IS the kernel's column order
    (``lamb_hp`` in the source) and the names are ``LambHp``'s fields; tests check both through the
    kernel's ``lamb_columns``. Every tensor of a group gets its group's row."""

    lr: float
    wd: float  # weight decay, decoupled, inside the trust-ratio norm
    b1: float
    b2: float
    one_minus_b1: float  # 1 - b1 in float64: 1 - 0.999f in float32 is off by 1e-5 relative
    one_minus_b2: float
    inv_bc1: float  # 1 / (1 - b1^t), 1 without bias correction
    inv_sqrt_bc2: float  # 1 / sqrt(1 - b2^t)
    eps: float
    grad_scale: float  # NVLAMB's global pre-clip factor, 1 when off
    clamp_w: float  # ||x|| is clamped to [0, clamp_w] in the ratio; inf when off
    clip_lo: float  # trust-ratio clip
    clip_hi: float
    adapt: float  # 1: trust ratio on, 0: plain AdamW step


class LarsColumns(NamedTuple):
    """One row of ``lars_step``'s hyperparameter table: field order = column order (``lars_hp``), names =
    ``LarsHp``'s fields, both checked through the kernel's ``lars_columns``."""

    lr: float
    wd: float
    momentum: float
    nesterov: float  # 1 / 0
    trust_coefficient: float  # eta
    eps: float  # guards local_lr's division (modes lars, larc)
    grad_scale: float  # global pre-clip factor, 1 when off
    clamp_w: float  # inf when off
    clip_lo: float
    clip_hi: float
    adapt: float  # 1 / 0
    mode: float  # LARS_MODES
    one_minus_momentum: float  # the dampening of lars_paper's momentum


LARS_MODES = {"lars": 0, "larc": 1, "lars_paper": 2}  # lars_step's ``mode`` column


def table(rows: list[NamedTuple]) -> torch.Tensor:
    """The float64 hp table a kernel reads: one row per tensor."""
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def no_clamp(value: float | None) -> float:
    """The clamp_w column: inf for "off"."""
    return math.inf if value is None else float(value)


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]  # no errno: sqrt vectorises
_lock = threading.Lock()
_module = None
_failed: str | None = None


def load(verbose: bool = False):
    """Build (first time) or load the kernels; returns the module, or None if the build failed."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        from torch.utils.cpp_extension import load_inline

        # The name carries a hash of source and flags: a changed kernel never loads a stale build.
        digest = hashlib.sha1((_SOURCE + " ".join(_FLAGS) + torch.__version__).encode()).hexdigest()[:12]
        if not _built(f"largebatch_optim_{digest}"):
            log.warning("largebatch.optim: building the C++ LAMB/LARS kernel once for this machine and torch "
                        "(1-4 min on 2 cores; cached for every later run)")
        try:
            _module = load_inline(
                name=f"largebatch_optim_{digest}",
                cpp_sources=[_SOURCE],
                functions=["lamb_step", "lars_step", "lamb_columns", "lars_columns"],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # any compiler/linker problem: fall back, never crash training
            _failed = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            log.warning("largebatch.optim: C++ kernel build failed, using the foreach path: %s", _failed)
        return _module


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds a build of ``name`` (a guess: False when unsure)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 - a private helper of torch: only the message depends on it
        return False


def failure() -> str | None:
    """Why the build failed in this process (None if it did not fail or was not tried)."""
    return _failed
