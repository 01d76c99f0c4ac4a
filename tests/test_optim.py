"""largebatch.optim: every variant against a float64 per-tensor reference written from the papers' formulas, edge
cases, exclusions, state_dict round trips, agreement with timm / torch_optimizer, descent, factory errors.

The C++ path is tested when its kernel builds (built once per session by the module fixture; ~20-70 s
the very first time on a machine, then cached in torch's extension directory)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from largebatch.optim import (
    OPTIMIZERS,
    Lamb,
    Lars,
    LarsPaper,
    _common,
    _cpp,
    create_optimizer,
    describe_optimizers,
    trust_ratio_stats,
)

INF = math.inf


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cpp_ok():
    return _cpp.load() is not None


@pytest.fixture(params=["cpp", "foreach"])
def impl(request, cpp_ok):
    if request.param == "cpp" and not cpp_ok:
        pytest.skip(f"C++ kernel unavailable: {_cpp.failure()}")
    return request.param


# ----------------------------------------------------------------------------- model and gradients
class Tiny(nn.Module):
    """1-D and 2-D tensors, an embedding, a LayerNorm; biases and norm weights are the excluded ones."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, tok):
        return self.fc2(torch.tanh(self.norm(self.fc1(self.emb(tok).sum(1)))))


def excluded(name: str) -> bool:
    return name.endswith("bias") or name.startswith("norm.")


def make_data(seed=0, n=48):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (n, 5), generator=gen), torch.randn(n, 3, generator=gen)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def loss_grads(model, tok, y):
    model.zero_grad()
    # A sum, not a mean: the global grad norm is well above 1, so NVLAMB's pre-clip acts.
    ((model(tok) - y) ** 2).sum().backward()


# ----------------------------------------------------------------------------- float64 references
class Reference:
    """Per-tensor Python loops in float64, straight from the papers' formulas."""

    def __init__(self, named, algo, lr, wd, *, betas=(0.9, 0.999), eps=1e-6, bias_correction=True,
                 clip=(0.0, INF), clamp_w=INF, grad_clip=None, momentum=0.9, eta=0.001, nesterov=False):
        self.p = {n: p.detach().double().clone() for n, p in named}
        self.algo, self.lr, self.wd = algo, lr, wd
        self.betas, self.eps, self.bc, self.clip, self.clamp_w = betas, eps, bias_correction, clip, clamp_w
        self.grad_clip, self.mom, self.eta, self.nesterov = grad_clip, momentum, eta, nesterov
        self.m = {n: torch.zeros_like(p) for n, p in self.p.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.p.items()}
        self.t = 0
        self.last_ratios = {}
        self.hits = set()  # which clip bounds acted during the run

    def _clip(self, r):
        self.hits |= {"lo"} if r < self.clip[0] else {"hi"} if r > self.clip[1] else set()
        return min(max(r, self.clip[0]), self.clip[1])

    def step(self, grads: dict):
        self.t += 1
        grads = {n: g.double() for n, g in grads.items()}
        if self.grad_clip is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
            grads = {n: g / max(1.0, total / self.grad_clip) for n, g in grads.items()}
        for n, x in self.p.items():
            getattr(self, "_" + self.algo)(n, x, grads[n], 0.0 if excluded(n) else self.wd, not excluded(n))

    def _lamb(self, n, x, g, wd, adapt):
        b1, b2 = self.betas
        self.m[n] = b1 * self.m[n] + (1 - b1) * g
        self.v[n] = b2 * self.v[n] + (1 - b2) * g * g
        m_hat = self.m[n] / (1 - b1**self.t) if self.bc else self.m[n]
        v_hat = self.v[n] / (1 - b2**self.t) if self.bc else self.v[n]
        u = m_hat / (v_hat.sqrt() + self.eps) + wd * x
        ratio = 1.0
        if adapt:
            xn, un = min(float(x.norm()), self.clamp_w), float(u.norm())
            ratio = self._clip(xn / un if xn > 0 and un > 0 else 1.0)
            self.last_ratios[n] = ratio
        x -= self.lr * ratio * u

    def _lars(self, n, x, g, wd, adapt, larc=False):
        local = 1.0
        if adapt:
            xn, gn = min(float(x.norm()), self.clamp_w), float(g.norm())
            den = gn + wd * xn
            local = self.eta * xn / (den + self.eps) if xn > 0 and den > 0 else 1.0
            if larc and xn > 0 and den > 0:
                local = local / self.lr
            local = self._clip(local)
            self.last_ratios[n] = local
        u = local * (g + wd * x)
        self.m[n] = self.mom * self.m[n] + u
        x -= self.lr * (u + self.mom * self.m[n] if self.nesterov else self.m[n])

    def _larc(self, n, x, g, wd, adapt):
        self._lars(n, x, g, wd, adapt, larc=True)

    def _lars_mlperf(self, n, x, g, wd, adapt):
        """MLPerf / TensorFlow: v = m*v + lr*ratio*(g + wd*x); x -= v (nesterov: x -= lr*ratio*u + m*v)."""
        local = 1.0
        if adapt:
            xn, gn = float(x.norm()), float(g.norm())
            den = gn + wd * xn
            local = self.eta * xn / (den + self.eps) if xn > 0 and den > 0 else 1.0
            self.last_ratios[n] = local
        u = self.lr * local * (g + wd * x)
        self.m[n] = self.mom * self.m[n] + u
        x -= u + self.mom * self.m[n] if self.nesterov else self.m[n]

    def _lars_paper(self, n, x, g, wd, adapt):
        b1 = self.mom
        self.m[n] = b1 * self.m[n] + (1 - b1) * (g + wd * x)
        ratio = 1.0
        if adapt:
            xn, mn = min(float(x.norm()), self.clamp_w), float(self.m[n].norm())
            ratio = self._clip(self.eta * xn / mn if xn > 0 and mn > 0 else 1.0)
            self.last_ratios[n] = ratio
        x -= self.lr * ratio * self.m[n]


# (registry name, options passed, lr, reference settings): the reference settings restate the paper's
# values on purpose, so the registry defaults are checked too.
CASES = {
    "lamb": ("lamb", {}, 0.01, dict(algo="lamb")),
    "lamb_v3": ("lamb_v3", {}, 0.01, dict(algo="lamb", bias_correction=False)),
    "lamb_v1": ("lamb_v1", {}, 0.01, dict(algo="lamb", clip=(0.0, 10.0))),
    "nvlamb": ("nvlamb", {}, 0.01, dict(algo="lamb", grad_clip=1.0)),
    "lambc": ("lambc", {}, 0.01, dict(algo="lamb", clip=(0.0, 1.0))),
    "lamb_clips": ("lamb", dict(trust_clip=[0.15, 0.3], clamp_weight_norm=2.5, betas=(0.8, 0.99), eps=1e-4),
                   0.01, dict(algo="lamb", clip=(0.15, 0.3), clamp_w=2.5, betas=(0.8, 0.99), eps=1e-4)),
    "lars_paper": ("lars_paper", {}, 0.005, dict(algo="lars_paper", eta=1.0)),
    # Unadapted tensors take the full lr in LARS, so lr stays small and eta is raised for visible steps.
    "lars": ("lars", dict(trust_coefficient=0.02), 0.01, dict(algo="lars", eps=1e-8, eta=0.02)),
    "lars_nesterov": ("lars", dict(nesterov=True, grad_clip_norm=5.0, trust_coefficient=0.02), 0.01,
                      dict(algo="lars", eps=1e-8, nesterov=True, grad_clip=5.0, eta=0.02)),
    "larc": ("larc", dict(trust_coefficient=0.02), 0.01, dict(algo="larc", eps=1e-8, clip=(0.0, 1.0), eta=0.02)),
    # momentum 0: no buffers (the kernel gets empty tensors in their place)
    "lars_no_momentum": ("lars", dict(momentum=0.0, trust_coefficient=0.02), 0.01,
                         dict(algo="lars", eps=1e-8, eta=0.02, momentum=0.0)),
}


def run_pair(case, impl, steps=50, wd=0.01):
    name, options, lr, ref_kw = CASES[case]
    model = make_model()
    ref = Reference(model.named_parameters(), lr=lr, wd=wd, **ref_kw)
    opt = create_optimizer(model, name, lr, weight_decay=wd, implementation=impl, **options)
    tok, y = make_data()
    for _ in range(steps):
        loss_grads(model, tok, y)
        ref.step({n: p.grad for n, p in model.named_parameters()})
        opt.step()
    assert opt.last_path == impl
    return model, opt, ref


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, impl):
    model, opt, ref = run_pair(case, impl)
    for n, p in model.named_parameters():
        want = ref.p[n]
        err = float((p.detach().double() - want).norm() / want.norm())
        assert err <= 1e-5, f"{case}/{impl}: {n} rel err {err:.2e}"
    stats = trust_ratio_stats(opt, per_layer=True)
    for n, r in ref.last_ratios.items():
        assert stats[f"trust_ratio/{n}"] == pytest.approx(r, rel=1e-4), n
    assert set(ref.last_ratios) == {k.split("/", 1)[1] for k in stats} - {"min", "mean", "max"}


def test_cases_exercise_the_clips():
    """The clip / pre-clip cases above would pass vacuously if the clip never acted."""
    for case, bounds in [("lamb_clips", {"lo", "hi"}), ("lambc", {"hi"}), ("larc", {"hi"})]:
        _, _, ref = run_pair(case, "foreach", steps=50)
        assert ref.hits == bounds, case
    model = make_model()
    loss_grads(model, *make_data())
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) > 5.0


def test_cpp_and_foreach_agree(cpp_ok):
    if not cpp_ok:
        pytest.skip("C++ kernel unavailable")
    for case in ("lamb", "lars", "lars_paper"):
        a, _, _ = run_pair(case, "cpp", steps=20)
        b, _, _ = run_pair(case, "foreach", steps=20)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert float((pa - pb).detach().norm() / pb.detach().norm()) <= 2e-6, case


def test_cpp_threaded_paths_match_foreach(cpp_ok):
    """With 2 threads the kernel splits the tensor above a thread's share and queues the others."""
    if not cpp_ok:
        pytest.skip("C++ kernel unavailable")
    gen = torch.Generator().manual_seed(3)
    shapes = [(600, 600), (300, 300), (1000,), (70000,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    torch.set_num_threads(2)
    try:
        for name in ("lamb", "lars", "lars_paper"):
            out = {}
            for impl in ("cpp", "foreach"):
                ps = [nn.Parameter(x.clone()) for x in init]
                groups = [{"params": ps[:3]}, {"params": ps[3:], "adapt": False, "weight_decay": 0.0}]
                opt = create_optimizer(groups, name, 0.01, weight_decay=0.01, implementation=impl)
                for step_grads in grads:
                    for p, g in zip(ps, step_grads):
                        p.grad = g
                    opt.step()
                out[impl] = ps
            for a, b in zip(out["cpp"], out["foreach"]):
                assert float((a - b).detach().norm() / b.detach().norm()) <= 2e-6, name
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_mlperf_puts_the_lr_inside_the_momentum(nesterov):
    """Against the float64 reference while the lr changes (warmup then decay), where the two forms differ;
    ``auto`` runs it on the foreach path (the C++ kernel lacks this form)."""
    lrs = [0.02 * (i + 1) / 10 for i in range(10)] + [0.02 * (1 - i / 30) ** 2 for i in range(30)]
    model, plain_model = make_model(), make_model()
    ref = Reference(model.named_parameters(), algo="lars_mlperf", lr=lrs[0], wd=0.01, eps=1e-8, eta=0.02,
                    nesterov=nesterov)
    opt = create_optimizer(model, "lars_mlperf", lrs[0], weight_decay=0.01, trust_coefficient=0.02,
                           nesterov=nesterov)
    plain = create_optimizer(plain_model, "lars", lrs[0], weight_decay=0.01, trust_coefficient=0.02,
                             nesterov=nesterov)
    tok, y = make_data()
    for lr in lrs:
        ref.lr = lr
        for o in (opt, plain):
            for group in o.param_groups:
                group["lr"] = lr
        loss_grads(model, tok, y)
        ref.step({n: p.grad for n, p in model.named_parameters()})
        opt.step()
        loss_grads(plain_model, tok, y)
        plain.step()
    assert opt.last_path == "foreach" and opt.implementation == "auto"
    for n, p in model.named_parameters():
        err = float((p.detach().double() - ref.p[n]).norm() / ref.p[n].norm())
        assert err <= 1e-5, f"{n} rel err {err:.2e}"
    stats = trust_ratio_stats(opt, per_layer=True)
    for n, r in ref.last_ratios.items():
        assert stats[f"trust_ratio/{n}"] == pytest.approx(r, rel=1e-4), n
    moved = max(float((p - q).detach().norm() / q.detach().norm())
                for p, q in zip(model.parameters(), plain_model.parameters()))
    assert moved > 1e-3  # the lr inside the buffer is not the project's default form


def test_lars_mlperf_equals_lars_at_a_constant_lr_and_refuses_the_kernel():
    a, _, _ = run_pair("lars", "foreach", steps=20)
    model = make_model()
    opt = create_optimizer(model, "lars_mlperf", 0.01, weight_decay=0.01, trust_coefficient=0.02)
    tok, y = make_data()
    for _ in range(20):
        loss_grads(model, tok, y)
        opt.step()
    for p, q in zip(model.parameters(), a.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="lr_in_momentum has no C..? kernel"):
        create_optimizer(model, "lars_mlperf", 0.01, implementation="cpp").step()


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", ["lamb", "lars", "larc", "lars_paper"])
def test_zero_norms_give_ratio_one(name, impl):
    x = nn.Parameter(torch.zeros(4, 3))  # ||x|| = 0
    z = nn.Parameter(torch.ones(5))  # gradient 0 -> ||u|| = 0 (no decay)
    opt = create_optimizer([x, z], name, lr=0.1, implementation=impl)
    x.grad, z.grad = torch.full_like(x, 0.5), torch.zeros_like(z)
    opt.step()
    assert trust_ratio_stats(opt)["trust_ratio/min"] == 1.0 == trust_ratio_stats(opt)["trust_ratio/max"]
    expected = {"lamb": -0.1 * 0.5 / (0.5 + 1e-6), "lars": -0.1 * 0.5, "larc": -0.1 * 0.5,
                "lars_paper": -0.1 * 0.1 * 0.5}[name]
    assert torch.allclose(x, torch.full_like(x, expected), rtol=1e-6)
    assert torch.equal(z.detach(), torch.ones(5))


@pytest.mark.parametrize("name,torch_cls,kw", [
    ("lamb", torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-6)),
    ("lars", torch.optim.SGD, dict(momentum=0.9)),
    ("larc", torch.optim.SGD, dict(momentum=0.9)),
    ("nesterov_lars", torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
])
def test_unadapted_tensors_follow_torch(name, torch_cls, kw, impl):
    """Excluded from adaptation but (here) decayed: exactly torch's AdamW / SGD with weight decay."""
    model = make_model()
    twin = copy.deepcopy(model)
    opts = dict(nesterov=True) if name == "nesterov_lars" else {}
    registry = "lars" if name == "nesterov_lars" else name
    opt = create_optimizer(model, registry, 0.01, weight_decay=0.1, implementation=impl,
                           exclude_from_weight_decay=[], exclude_from_adaptation=["bias"], **opts)
    biases = [p for n, p in twin.named_parameters() if n.endswith("bias")]
    ref = torch_cls(biases, lr=0.01, weight_decay=0.1, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):  # synthetic gradients: the bias trajectories do not depend on the other tensors
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if n.endswith("bias"):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip(name):
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen) for p in make_model().parameters()] for _ in range(12)]

    def steps(model, opt, gs):
        for step_grads in gs:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()

    model = make_model()
    opt = create_optimizer(model, name, 0.01, weight_decay=0.01)
    steps(model, opt, grads[:6])
    saved_params, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, grads[6:])
    fresh = make_model(seed=5)
    fresh.load_state_dict(saved_params)
    fresh_opt = create_optimizer(fresh, name, 0.5, weight_decay=0.3)  # overwritten by the load
    fresh_opt.load_state_dict(saved_opt)
    steps(fresh, fresh_opt, grads[6:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- other libraries
def _same_grads_run(ours, theirs, model, twin, steps=30):
    tok, y = make_data()
    for _ in range(steps):
        loss_grads(model, tok, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=2e-5, atol=1e-6), n


def _timm_groups(model, wd):
    # timm adapts exactly the tensors with weight decay != 0: our default grouping, by hand.
    decay = [p for n, p in model.named_parameters() if not excluded(n)]
    rest = [p for n, p in model.named_parameters() if excluded(n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("name,timm_kw", [
    ("lamb", dict(max_grad_norm=None)), ("nvlamb", dict(max_grad_norm=1.0)),
    ("lambc", dict(max_grad_norm=None, trust_clip=True)), ("lamb_v3", dict(max_grad_norm=None,
                                                                          bias_correction=False)),
])
def test_matches_timm_lamb(name, timm_kw, impl):
    timm_optim = pytest.importorskip("timm.optim")
    model = make_model()
    twin = copy.deepcopy(model)
    ours = create_optimizer(model, name, 0.01, weight_decay=0.01, implementation=impl)
    theirs = timm_optim.Lamb(_timm_groups(twin, 0.01), lr=0.01, eps=1e-6, **timm_kw)
    _same_grads_run(ours, theirs, model, twin)


@pytest.mark.parametrize("name,trust_clip", [("lars", False), ("larc", True)])
def test_matches_timm_lars(name, trust_clip, impl):
    timm_optim = pytest.importorskip("timm.optim")
    model = make_model()
    twin = copy.deepcopy(model)
    ours = create_optimizer(model, name, 0.01, weight_decay=0.01, trust_coefficient=0.02, implementation=impl)
    theirs = timm_optim.Lars(_timm_groups(twin, 0.01), lr=0.01, momentum=0.9, trust_coeff=0.02, eps=1e-8,
                             trust_clip=trust_clip)
    _same_grads_run(ours, theirs, model, twin)


def test_matches_torch_optimizer_lamb(impl):
    """torch_optimizer.Lamb = v3 (no bias correction) adapting every tensor, ||x|| clamped at 10."""
    topt = pytest.importorskip("torch_optimizer")
    model = make_model()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)  # ||x|| > 10: the clamp acts
    assert model.emb.weight.norm() > 10
    twin = copy.deepcopy(model)
    ours = create_optimizer(list(model.parameters()), "lamb_v3", 0.01, weight_decay=0.01,
                            clamp_weight_norm=10.0, implementation=impl)
    theirs = topt.Lamb(twin.parameters(), lr=0.01, eps=1e-6, weight_decay=0.01, clamp_value=10)
    _same_grads_run(ours, theirs, model, twin)


# ----------------------------------------------------------------------------- registry and factory
DESCENT_LR = {"lars": 0.1, "lars_mlperf": 0.1, "larc": 0.05, "lars_paper": 0.02, "sgd": 0.01, "nesterov": 0.01, "adagrad": 0.05}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_entry_descends(name):
    model = make_model()
    opt = create_optimizer(model, name, DESCENT_LR.get(name, 0.01), weight_decay=0.01)
    tok, y = make_data()
    losses = []
    for _ in range(15):
        model.zero_grad()
        loss = ((model(tok) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses
    stats = trust_ratio_stats(opt)
    if OPTIMIZERS[name].adapts:
        assert 0 < stats["trust_ratio/min"] <= stats["trust_ratio/mean"] <= stats["trust_ratio/max"] < INF
    else:
        assert stats == {}


def test_param_groups_and_logging(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2, bias=False),
                          nn.GroupNorm(1, 2))
    with caplog.at_level(logging.INFO, logger="largebatch.optim"):
        opt = create_optimizer(model, "lamb", 0.01, weight_decay=0.1)
    groups = {(g["weight_decay"], g["adapt"]): g["param_names"] for g in opt.param_groups}
    assert groups == {(0.1, True): ["0.weight", "3.weight"],
                      (0.0, False): ["0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]}
    assert "2 tensors, 116 params" in caplog.text and "5 tensors, 16 params" in caplog.text
    opt = create_optimizer(model, "lamb", 0.01, weight_decay=0.1, exclude_from_weight_decay=["bias"],
                           exclude_from_adaptation=[])
    assert {(g["weight_decay"], g["adapt"], len(g["params"])) for g in opt.param_groups} == {
        (0.1, True, 4), (0.0, True, 3)}
    opt = create_optimizer(model, "adamw", 0.01, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 5] and "adapt" not in opt.param_groups[0]


def test_factory_errors_and_raw_params():
    model = make_model()
    with pytest.raises(ValueError, match="registered: lamb, lamb_v3"):
        create_optimizer(model, "lamb2", 0.1)
    with pytest.raises(ValueError, match="valid options: .*momentum"):
        create_optimizer(model, "sgd", 0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="valid options"):
        create_optimizer(model, "adamw", 0.1, trust_clip=1.0)
    with pytest.raises(ValueError, match="implementation"):
        create_optimizer(model, "lamb", 0.1, implementation="cuda-magic")
    with pytest.raises(ValueError, match="trust_clip"):
        create_optimizer(model, "lamb", 0.1, trust_clip="big")
    with pytest.raises(ValueError, match="need parameter names"):
        create_optimizer(list(model.parameters()), "lamb", 0.1, exclude_from_weight_decay=["bias"])
    opt = create_optimizer(list(model.parameters()), "lamb", 0.1, weight_decay=0.01, eps=None)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["adapt"] and opt.param_groups[0]["weight_decay"] == 0.01


def test_auto_falls_back_when_the_build_fails(monkeypatch, caplog):
    monkeypatch.setattr(_cpp, "load", lambda verbose=False: None)
    monkeypatch.setattr(_common, "_warned", set())
    model = make_model()
    loss_grads(model, *make_data())
    with caplog.at_level(logging.WARNING):
        opt = create_optimizer(model, "lamb", 0.01)
        opt.step()
    assert opt.last_path == "foreach" and "falling back" in caplog.text
    with pytest.raises(RuntimeError, match="failed to build"):
        create_optimizer(model, "lars", 0.01, implementation="cpp").step()


def test_build_cpu_kernels_reports_the_build(cpp_ok, monkeypatch):
    """True when the kernel built, and then a fp32 CPU step takes it; False when the build fails."""
    from largebatch.optim import build_cpu_kernels

    if cpp_ok:
        assert build_cpu_kernels() is True
        model = make_model()
        loss_grads(model, *make_data())
        opt = create_optimizer(model, "lamb", 0.01)
        opt.step()
        assert opt.last_path == "cpp"
    monkeypatch.setattr(_cpp, "load", lambda verbose=False: None)
    assert build_cpu_kernels() is False


def test_non_fp32_params_use_foreach():
    model = make_model().double()
    loss_grads(model, torch.randint(0, 12, (4, 5)), torch.randn(4, 3, dtype=torch.float64))
    opt = create_optimizer(model, "lamb", 0.01)
    opt.step()
    assert opt.last_path == "foreach"
    with pytest.raises(ValueError, match="float32 CPU"):
        create_optimizer(model, "lamb", 0.01, implementation="cpp").step()


def test_sparse_gradients_are_refused():
    for name in ("lamb", "lars", "lars_paper"):
        p = nn.Parameter(torch.ones(4, 2))
        p.grad = torch.ones(4, 2).to_sparse()
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            create_optimizer([p], name, 0.1).step()


# ----------------------------------------------------------------------------- one skeleton, one home
def test_kernel_reads_the_named_columns(cpp_ok):
    """The field order of _cpp.LambColumns / LarsColumns IS the column order the kernel reads: the
    kernel reports, by its own struct field names, what it read from each row."""
    if not cpp_ok:
        pytest.skip("C++ kernel unavailable")
    kernel = _cpp.load()
    for columns, read, flags in [(_cpp.LambColumns, kernel.lamb_columns, ("adapt",)),
                                 (_cpp.LarsColumns, kernel.lars_columns, ("adapt", "nesterov"))]:
        # Two rows of distinct whole numbers (exact in float32 and in the int mode column); the boolean
        # columns 1/0 in the first row, swapped in the second.
        rows = [columns(**{f: float(f == flags[0]) if f in flags else 2.0 + i
                           for i, f in enumerate(columns._fields)}),
                columns(**{f: float(f != flags[0]) if f in flags else 100.0 + i
                           for i, f in enumerate(columns._fields)})]
        for k, row in enumerate(rows):
            assert read(_cpp.table(rows), k) == row._asdict(), (columns.__name__, k)
        with pytest.raises(RuntimeError, match="columns"):
            read(_cpp.table(rows)[:, :-1], 0)
    assert len(_cpp.LambColumns._fields) == 14 and len(_cpp.LarsColumns._fields) == 13


def test_registry_entries_are_described_data():
    for name, spec in OPTIMIZERS.items():
        assert spec.name == name
        assert spec.description and "\n" not in spec.description and len(spec.description) <= 100, name
        if spec.base is not None:
            base = OPTIMIZERS[spec.base]
            assert base.base is None and base.cls is spec.cls, name
            assert set(spec.defaults) == set(base.defaults), name  # the diff below is complete
            assert any(spec.defaults[k] != v for k, v in base.defaults.items()), f"{name} equals {spec.base}"
        assert not any(callable(v) for v in spec.defaults.values()), name


def test_describe_optimizers_lists_every_entry_and_what_it_changes():
    table = describe_optimizers()
    lines = table.splitlines()
    assert lines[0].split() == ["name", "is", "description"] and set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == list(OPTIMIZERS)
    for name, spec in OPTIMIZERS.items():
        assert rows[name].rstrip().endswith(spec.description), name
    assert "  lamb + grad_clip_norm=1.0  " in rows["nvlamb"]
    assert "  lamb + bias_correction=False  " in rows["lamb_v3"]
    assert "  lars + mode=larc, trust_clip=1.0  " in rows["larc"]
    assert "  sgd + nesterov=True  " in rows["nesterov"]
    assert "  Lamb  " in rows["lamb"] and "  LarsPaper  " in rows["lars_paper"]
    assert "  torch.optim.AdamW  " in rows["adamw"]


@pytest.mark.parametrize("cls,entry", [(Lamb, "lamb"), (Lars, "lars"), (LarsPaper, "lars_paper")])
def test_classes_take_their_defaults_from_the_registry(cls, entry):
    opt = cls([nn.Parameter(torch.ones(3))], lr=0.1)
    defaults = OPTIMIZERS[entry].defaults
    group_keys = set(opt.defaults) - {"lr", "weight_decay", "adapt"}
    assert group_keys == set(defaults) - {"grad_clip_norm", "implementation", "exclude_from_weight_decay",
                                          "exclude_from_adaptation"}
    for key in group_keys:
        want = defaults[key]
        assert opt.defaults[key] == (tuple(want) if isinstance(want, list) else want), key
    assert opt.grad_clip_norm == defaults["grad_clip_norm"] and opt.implementation == defaults["implementation"]
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["adapt"] is True


def test_option_checks():
    p = [nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="LarsPaper"):
        Lars(p, lr=0.1, mode="lamb_paper")
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        Lars(p, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="normalises the momentum"):
        LarsPaper(p, lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="betas"):
        Lamb(p, lr=0.1, betas=(0.9, 1.0))
    for cls in (Lamb, Lars, LarsPaper):
        with pytest.raises(ValueError, match="grad_clip_norm"):
            cls(p, lr=0.1, grad_clip_norm=0.0)
        with pytest.raises(ValueError, match="clamp_weight_norm"):
            cls(p, lr=0.1, clamp_weight_norm=-1.0)
        with pytest.raises(ValueError, match=">= 0"):
            cls(p, lr=-0.1)
