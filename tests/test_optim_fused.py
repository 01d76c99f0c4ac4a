"""torch's fused CPU kernels and non-dense parameters: the bug (reproduced on this torch), and the torch
baselines' ``implementation="auto"`` steering around it (largebatch/optim/baselines.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from largebatch.optim import baselines, create_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# registry entry, torch class, lr, options: each converges on the problem below with foreach
CASES = [("adamw", torch.optim.AdamW, 0.1, {}), ("adam", torch.optim.Adam, 0.1, {}),
         ("adagrad", torch.optim.Adagrad, 0.1, {}), ("sgd", torch.optim.SGD, 0.01, dict(momentum=0.9))]
STEPS = 200


def problem():
    """(w @ x + b)^2 with w a strided view: not dense (every other element of its storage)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0])
    b = torch.nn.Parameter(torch.randn(10))
    x = torch.randn(5)
    assert not w.is_contiguous() and not baselines.is_dense(w)
    return w, b, x


def descend(opt, w, b, x) -> tuple[float, float]:
    first = None
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((w @ x + b) ** 2).sum()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    return first, ((w @ x + b) ** 2).sum().item()


@pytest.mark.parametrize("name,cls,lr,kw", CASES, ids=[c[0] for c in CASES])
def test_torch_fused_is_wrong_for_non_dense_params(name, cls, lr, kw):
    """The bug the density rule exists for. If this fails, torch fixed it: the rule can be relaxed."""
    w, b, x = problem()
    first, fused = descend(cls([w, b], lr=lr, weight_decay=0.0, fused=True, **kw), w, b, x)
    w, b, x = problem()
    _, foreach = descend(cls([w, b], lr=lr, weight_decay=0.0, foreach=True, **kw), w, b, x)
    assert foreach < 1e-6 < 1e-3 * first
    assert fused > 1e5 * foreach, (name, first, fused, foreach)
    if name == "adamw":  # the example: the loss grows instead (69 -> 677 here)
        assert fused > 5 * first


@pytest.mark.parametrize("name,cls,lr,kw", CASES, ids=[c[0] for c in CASES])
def test_auto_uses_foreach_for_non_dense_params(name, cls, lr, kw):
    w, b, x = problem()
    opt = create_optimizer([("w", w), ("b", b)], name, lr, implementation="auto", **kw)
    assert isinstance(opt, cls) and not opt.defaults.get("fused") and opt.defaults["foreach"]
    first, auto = descend(opt, w, b, x)
    w, b, x = problem()
    _, foreach = descend(cls([w, b], lr=lr, weight_decay=0.0, foreach=True, **kw), w, b, x)
    assert auto == pytest.approx(foreach, rel=1e-6, abs=1e-12) and auto < 1e-6 < 1e-3 * first


def test_non_dense_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(baselines, "_logged_not_dense", False)
    w, b, _ = problem()
    with caplog.at_level(logging.INFO, logger="largebatch.optim"):
        for name in ("adamw", "sgd", "adamw"):
            create_optimizer([("w", w), ("b", b)], name, 0.1)
    records = [r for r in caplog.records if "not dense" in r.getMessage()]
    assert len(records) == 1 and "w (shape (10, 5), stride (10, 2))" in records[0].getMessage()


def test_fused_refuses_non_dense_params():
    w, b, _ = problem()
    for name, *_ in CASES:
        with pytest.raises(ValueError, match=r"needs dense parameters.*Not dense: w \(shape"):
            create_optimizer([("w", w), ("b", b)], name, 0.1, implementation="fused")
    with pytest.raises(ValueError, match="param0"):  # unnamed tensors are named by position
        create_optimizer([w, b], "adamw", 0.1, implementation="fused")


def test_dense_layouts_keep_the_fused_kernel():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous() and baselines.is_dense(conv.weight)
    transposed = torch.nn.Parameter(torch.randn(5, 10).t())
    for name, *_ in CASES:
        opt = create_optimizer([*conv.named_parameters(), ("t", transposed)], name, 0.1)
        assert opt.defaults["fused"] is True, name


def test_is_dense():
    dense = [torch.randn(3, 4), torch.randn(4, 3).t(), torch.randn(2, 3, 4).permute(2, 0, 1),
             torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(8)[2:6],
             torch.randn(3, 1, 4)[:, :, :], torch.randn(4, 1).expand(4, 1), torch.randn(0, 3), torch.randn(())]
    not_dense = [torch.randn(10, 5, 2)[..., 0], torch.randn(8)[::2], torch.randn(1, 5).expand(10, 5),
                 torch.randn(6, 6)[:3, :3], torch.randn(4, 3).t()[:2, :]]
    assert all(baselines.is_dense(t) for t in dense)
    assert not any(baselines.is_dense(t) for t in not_dense)
