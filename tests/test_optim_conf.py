"""Every conf/optimizer/*.yaml composes, names a registry entry, and its options build a working optimizer."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from largebatch.optim import OPTIMIZERS, create_optimizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP start-up only costs on a busy machine
    yield
    torch.set_num_threads(before)


NAMES = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))


def test_every_registry_entry_has_a_config():
    assert set(OPTIMIZERS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_config_builds_and_steps(compose_cfg, name):
    from largebatch.config import optimizer_options

    cfg = compose_cfg(f"optimizer={name}")
    assert cfg.optimizer.name == name in OPTIMIZERS
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt = create_optimizer(model, name, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
                           **optimizer_options(cfg.optimizer))
    model(torch.randn(16, 4)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert OmegaConf.to_container(cfg.optimizer)["lr"] > 0
