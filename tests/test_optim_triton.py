"""The Triton (CUDA) path of LAMB/LARS, run by Triton's interpreter on CPU tensors: every variant against
the float64 reference of tests/test_optim.py, the C++ kernel and foreach; bfloat16 params with float32
state; the path choice and its fallbacks (no GPU, no Triton, a kernel that fails to build, DTensors).

Chunks and blocks are shrunk (``small_chunks``) so that tensors span several programs and the per-tensor
sum of chunk partials loops, as BERT's tensors do on a GPU with the real sizes."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from test_optim import CASES, Reference, excluded, loss_grads, make_data, make_model, run_pair
from torch import nn

from largebatch.optim import _common, _cpp, _triton, create_optimizer, trust_ratio_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KERNELS = "largebatch.optim._triton_kernels"


def _reset(monkeypatch):
    sys.modules.pop(KERNELS, None)  # the interpreter is chosen when the kernels are defined
    for name, value in (("_kernels", None), ("_failed", None), ("_probed", {})):
        monkeypatch.setattr(_triton, name, value)


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _reset(monkeypatch)
    for name, value in (("CHUNK", 64), ("BLOCK", 16), ("RBLOCK", 4)):
        monkeypatch.setattr(_triton, name, value)
    yield
    monkeypatch.delenv("TRITON_INTERPRET")
    sys.modules.pop(KERNELS, None)


def rel_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# The default and one clipped variant of each family run in the fast suite, the other variants as slow.
FAST = ("lamb", "lamb_clips", "lars", "larc", "lars_paper")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_matches_float64_reference(case, interpreted):
    model, opt, ref = run_pair(case, "triton", steps=10)
    for n, p in model.named_parameters():
        assert rel_err(p, ref.p[n]) <= 1e-5, f"{case}: {n}"
    stats = trust_ratio_stats(opt, per_layer=True)
    for n, r in ref.last_ratios.items():
        assert stats[f"trust_ratio/{n}"] == pytest.approx(r, rel=1e-4), n
    assert set(ref.last_ratios) == {k.split("/", 1)[1] for k in stats} - {"min", "mean", "max"}


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_mlperf_lr_inside_the_momentum(nesterov, interpreted):
    """The form the C++ kernel lacks, while the lr changes (where it differs from the default form)."""
    lrs = [0.02 * (i + 1) / 5 for i in range(5)] + [0.02 * (1 - i / 10) ** 2 for i in range(10)]
    model = make_model()
    ref = Reference(model.named_parameters(), algo="lars_mlperf", lr=lrs[0], wd=0.01, eps=1e-8, eta=0.02,
                    nesterov=nesterov)
    opt = create_optimizer(model, "lars_mlperf", lrs[0], weight_decay=0.01, trust_coefficient=0.02,
                           nesterov=nesterov, implementation="triton")
    tok, y = make_data()
    for lr in lrs:
        ref.lr = lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss_grads(model, tok, y)
        ref.step({n: p.grad for n, p in model.named_parameters()})
        opt.step()
    assert opt.last_path == "triton"
    for n, p in model.named_parameters():
        assert rel_err(p, ref.p[n]) <= 1e-5, n


def test_agrees_with_the_cpp_kernel_and_repeats_bitwise(interpreted):
    if _cpp.load() is None:
        pytest.skip(f"C++ kernel unavailable: {_cpp.failure()}")
    for case in ("lamb", "lars", "lars_paper"):
        a, _, _ = run_pair(case, "triton", steps=5)
        b, _, _ = run_pair(case, "cpp", steps=5)
        again, _, _ = run_pair(case, "triton", steps=5)
        for pa, pb, pc in zip(a.parameters(), b.parameters(), again.parameters()):
            assert rel_err(pa, pb) <= 2e-6, case
            assert torch.equal(pa, pc), case


def _bf16_problem():
    """Tensors of 1 to 7 chunks (so the partial sums loop); "bias" is neither decayed nor adapted."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(20, 20), (7,), (300,), (9, 3)]
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(3)]
    return init, grads


def to_bf16(t: torch.Tensor, truncate: bool) -> torch.Tensor:
    """float64 -> bfloat16 -> float64, rounding to nearest even (torch, the GPU) or toward zero (what
    Triton's interpreter does: it ignores rounding modes when it narrows float32 to bfloat16)."""
    if not truncate:
        return t.to(torch.bfloat16).double()
    bits = t.float().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).double()


# nvlamb is left out: its global pre-clip norm of bfloat16 grads is taken in bfloat16 by
# _common.global_grad_scale (shared with foreach), 3 significant digits against the reference's float64.
@pytest.mark.parametrize("name", ["lamb", "lars", "lars_paper"])
def test_bf16_params_keep_float32_state(name, interpreted):
    """bfloat16 params and grads, float32 state: each path equals the float64 reference narrowed to
    bfloat16 after every step as that path narrows (see to_bf16), up to one bfloat16 unit where the
    float32 math lands next to a rounding edge; the state is float32."""
    init, grads = _bf16_problem()
    kw = dict(trust_coefficient=0.02) if name == "lars" else {}
    ref_kw = dict(eta=0.02, eps=1e-8) if name == "lars" else dict(eta=1.0) if name == "lars_paper" else {}
    for impl in ("triton", "foreach"):
        named = [(f"w{i}" if i != 1 else "bias", nn.Parameter(x.clone())) for i, x in enumerate(init)]
        ref = Reference(named, algo=name, lr=0.01, wd=0.01, **ref_kw)
        opt = create_optimizer(named, name, 0.01, weight_decay=0.01, implementation=impl, **kw)
        for step_grads in grads:
            for (_, p), g in zip(named, step_grads):
                p.grad = g
            ref.step({n: p.grad for n, p in named})
            for n in ref.p:
                ref.p[n] = to_bf16(ref.p[n], truncate=impl == "triton")
            opt.step()
        assert opt.last_path == impl
        assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values())
        for n, p in named:
            assert p.dtype == torch.bfloat16
            want = ref.p[n]
            ulp = want.abs().clamp(min=1e-30) * 2.0**-7
            assert bool(((p.double() - want).abs() <= ulp).all()), (impl, n)
            assert float((p.double() == want).double().mean()) >= 0.98, (impl, n)


def test_loaded_state_stays_float32_for_bf16_params():
    p = nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    opt = create_optimizer([p], "lamb", 0.01, implementation="foreach")
    p.grad = torch.randn(4, 3).to(torch.bfloat16)
    opt.step()
    again = create_optimizer([p], "lamb", 0.01, implementation="foreach")
    again.load_state_dict(opt.state_dict())  # torch casts loaded state to the param's dtype
    assert {v.dtype for v in again.state[p].values()} == {torch.float32}


# ----------------------------------------------------------------------------- path choice, fallbacks
def test_without_a_gpu_auto_keeps_the_cpu_paths_and_triton_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_model()
    loss_grads(model, *make_data())
    opt = create_optimizer(model, "lamb", 0.01)
    opt.step()
    assert opt.last_path in ("cpp", "foreach") and KERNELS not in sys.modules
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        create_optimizer(model, "lars", 0.01, implementation="triton").step()
    with pytest.raises(ValueError, match="implementation must be one of"):
        create_optimizer(model, "lamb", 0.01, implementation="cuda")


def test_auto_falls_back_to_foreach_when_the_kernel_fails_to_build(monkeypatch, caplog):
    """As on a GPU machine whose Triton cannot compile (no ptxas, an old driver): no step is half done."""
    monkeypatch.setattr(_triton, "choose_path", lambda requested, tensors, cpp_ok=True: "triton")
    monkeypatch.setattr(_triton, "available", lambda *args: "RuntimeError: ptxas not found")
    monkeypatch.setattr(_common, "_warned", set())
    model = make_model()
    loss_grads(model, *make_data())
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING):
        opt = create_optimizer(model, "lamb", 0.01)
        opt.step()
    assert opt.last_path == "foreach" and "ptxas not found" in caplog.text and "falling back" in caplog.text
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    explicit = create_optimizer(model, "lamb", 0.01, implementation="triton")
    with pytest.raises(RuntimeError, match="ptxas not found"):
        _triton.step(explicit, explicit._gather(), None)


def test_no_triton_is_a_reason_not_a_crash(monkeypatch):
    _reset(monkeypatch)

    def broken(name):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(_triton.importlib, "import_module", broken)
    assert _triton.load() is None and "No module named 'triton'" in _triton.failure()
    assert _triton.available("lamb_step", torch.float32, torch.float32, torch.device("cpu")).startswith(
        "Triton is unavailable")


def test_sharded_params_never_take_the_kernel(monkeypatch, interpreted):
    """A DTensor's local tensor is one shard: auto routes it to foreach (whose norms reduce over the
    shards: tests/test_scaleout.py), an explicit 'triton' is refused."""
    x = torch.ones(3)
    monkeypatch.setattr(_common, "is_sharded", lambda t: True)
    assert _triton.choose_path("auto", [x.cuda() if torch.cuda.is_available() else x]) == "foreach"
    with pytest.raises(ValueError, match="sharded"):
        _triton.choose_path("triton", [x])


def test_path_choice_rules(interpreted):
    x = torch.ones(4)
    assert _triton.choose_path("triton", [x]) == "triton"  # CPU, interpreted
    assert _triton.choose_path("auto", [x]) in ("cpp", "foreach")  # CPU: the C++ kernel or foreach
    assert _triton.choose_path("auto", [x], cpp_ok=False) == "foreach"
    with pytest.raises(ValueError, match="lr_in_momentum has no C"):
        _triton.choose_path("cpp", [x], cpp_ok=False)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        _triton.choose_path("triton", [x.double()])
    with pytest.raises(ValueError, match="dense"):
        _triton.choose_path("triton", [torch.ones(4, 4)[:, ::2]])


def test_unadapted_groups_and_excluded_decay_take_the_plain_step(interpreted):
    """Biases/norms (no decay, no ratio) are finished in pass 1: exactly AdamW / SGD-momentum."""
    model, twin = make_model(), make_model()
    opt = create_optimizer(model, "lamb", 0.01, weight_decay=0.01, implementation="triton")
    ref = create_optimizer(twin, "lamb", 0.01, weight_decay=0.01, implementation="foreach")
    tok, y = make_data()
    for _ in range(5):
        loss_grads(model, tok, y)
        loss_grads(twin, tok, y)
        opt.step()
        ref.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p, q) <= 2e-6, n
    assert any(excluded(n) for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- the CUDA build
POINTER_TYPES = {"hp": "*fp64", "partials": "*fp32", "ratios": "*fp32", "grad_scale": "*fp32"}  # others: *i64


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype, monkeypatch):
    """The real CUDA build (Triton -> PTX -> cubin for sm_90, as on an H100/H200), with IEEE float32 division
    and square root in the PTX: what a GPU run would compile first."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _reset(monkeypatch)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _triton.load()
    assert kernels is not None, _triton.failure()
    tl_dtype = kernels.TL_DTYPES[getattr(torch, dtype)]
    values = dict(X=tl_dtype, G=tl_dtype, CHUNK=_triton.CHUNK, BLOCK=_triton.BLOCK, RBLOCK=_triton.RBLOCK)
    for fn in (kernels.lamb_pass1, kernels.lamb_pass2, kernels.lars_pass1, kernels.lars_pass2):
        constexprs = {n: values[n] for n in fn.arg_names if n in values}
        signature = {n: "constexpr" if n in values else POINTER_TYPES.get(n, "*i64") for n in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 1000 and "sqrt.approx.f32" not in ptx, fn.__name__
        if "pass1" in fn.__name__ and "lamb" in fn.__name__:
            assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    sys.modules.pop(KERNELS, None)
