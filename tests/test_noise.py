"""The gradient noise scale (largebatch/noise.py): the estimator's numerics, and the trainer's measurement."""

from __future__ import annotations

import json

import pytest
import torch

from largebatch.noise import NoiseScale
from largebatch.train import train


def test_estimator_is_exact_on_expected_norms():
    """E|g_B|^2 = |G|^2 + tr(Sigma)/B for a mean of B samples: fed those, the two estimates are exact."""
    grad_sq, trace = 2.5, 40.0
    noise = NoiseScale(window=4)
    for small, big in [(8, 64), (4, 32), (1, 2)]:
        noise.add(grad_sq + trace / small, small, grad_sq + trace / big, big, big_samples=big)
    got = noise.metrics()
    assert got["noise/grad_sq"] == pytest.approx(grad_sq)
    assert got["noise/trace"] == pytest.approx(trace)
    assert got["noise/b_simple"] == pytest.approx(trace / grad_sq)


def test_estimator_recovers_b_simple_from_sampled_gradients():
    """Per-sample gradients drawn around a known G with a known covariance: the windowed estimate from
    one small and one big batch a step lands near tr(Sigma)/|G|^2; a single step's is far noisier."""
    gen = torch.Generator().manual_seed(0)
    dim, small, big, steps = 50, 4, 32, 400
    true_grad = torch.full((dim,), 0.2)
    scales = torch.linspace(0.5, 1.5, dim)  # a diagonal covariance
    truth = float((scales ** 2).sum() / true_grad.square().sum())  # 41.7 samples
    noise = NoiseScale(window=steps)
    singles = []
    for _ in range(steps):
        samples = true_grad + scales * torch.randn(big, dim, generator=gen)
        g_small, g_big = samples[:small].mean(0), samples.mean(0)
        noise.add(float(g_small.square().sum()), small, float(g_big.square().sum()), big, big_samples=big)
        one = NoiseScale(window=1)
        one.add(float(g_small.square().sum()), small, float(g_big.square().sum()), big, big_samples=big)
        singles.append(one.metrics()["noise/b_simple"] or 0.0)
    assert noise.metrics()["noise/b_simple"] == pytest.approx(truth, rel=0.15)
    assert torch.tensor(singles).std() > 0.3 * truth  # why the window exists


def test_units_are_converted_to_samples():
    """Counted in loss units (e.g. 5 masked tokens a sequence), reported in samples."""
    noise = NoiseScale(window=1)
    noise.add(1.0 + 10.0 / 20, 20, 1.0 + 10.0 / 160, 160, big_samples=32)
    assert noise.metrics()["noise/b_simple"] == pytest.approx(10.0 / 5)


def test_window_survives_a_state_round_trip():
    noise = NoiseScale(window=3)
    for k in range(5):
        noise.add(3.0 + k, 2, 1.0, 8, big_samples=8)
    again = NoiseScale(window=3, state=json.loads(json.dumps(noise.state_dict())))
    assert again.metrics() == noise.metrics() and len(again.grad_sq) == 3


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("micro_batch", [16, 4])  # one micro-batch (the half-batch probe) | accumulation
def test_trainer_logs_it_without_changing_the_run(compose_cfg, tmp_path, one_torch_thread, micro_batch):
    """The probe runs under a forked RNG and leaves no gradient behind: with dropout on, the losses
    are bitwise those of a run that does not measure; the noise keys appear on log steps."""
    base = ["batch=16", f"micro_batch={micro_batch}", "epochs=0.1", "log_every=2", "save_checkpoint=false",
            "model.dropout=0.1", "noise_scale_window=3"]
    train(compose_cfg(*base), tmp_path / "on")
    train(compose_cfg(*base, "noise_scale=false"), tmp_path / "off")
    with_noise, without = _metrics(tmp_path / "on"), _metrics(tmp_path / "off")
    assert [m.get("loss") for m in with_noise] == [m.get("loss") for m in without]
    assert [m.get("grad_norm") for m in with_noise] == [m.get("grad_norm") for m in without]
    logged = [m for m in with_noise if "loss" in m]
    assert logged and all(m["noise/trace"] > 0 for m in logged)
    assert not any(k.startswith("noise/") for m in without for k in m)
    b_simple = [m["noise/b_simple"] for m in logged if m["noise/b_simple"] is not None]
    assert b_simple and all(b > 0 for b in b_simple)
