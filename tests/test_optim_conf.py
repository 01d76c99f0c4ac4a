"""conf/optimizer/*.yaml and the registry: every file composes, names a registry entry and builds a working
optimizer; the registry is the one home of every default, so a file lists name, lr, weight_decay and
only the options that DIFFER from its entry (each with a comment); every option stays overridable."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from largebatch.config import OPTIMIZER_KEYS_NOT_OPTIONS, OptimizerConfig, optimizer_options
from largebatch.optim import OPTIMIZERS, create_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONF = REPO / "conf" / "optimizer"
NAMES = sorted(p.stem for p in CONF.glob("*.yaml"))


def test_every_registry_entry_has_a_config():
    assert set(OPTIMIZERS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_config_builds_and_steps(compose_cfg, name):
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


def _same(a, b) -> bool:
    """Equal as config values: a YAML list [0.9, 0.999] restates the registry's tuple (0.9, 0.999)."""
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_states_only_what_differs_from_the_registry(compose_cfg, name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    keys = [k for k in raw if k != "defaults"]
    assert set(OPTIMIZER_KEYS_NOT_OPTIONS) <= set(keys), f"{name}.yaml must set name, lr and weight_decay"
    defaults = OPTIMIZERS[name].defaults
    options = {k: v for k, v in raw.items() if k not in ("defaults", *OPTIMIZER_KEYS_NOT_OPTIONS)}
    for key, value in options.items():
        assert key in defaults, f"{name}.yaml: {key} is not an option of registry entry {name}"
        assert not _same(value, defaults[key]), (
            f"{name}.yaml: {key}: {value} restates the registry default; leave it to the registry")
    # What the trainer passes on is exactly that difference: the schema adds no values of its own.
    assert optimizer_options(compose_cfg(f"optimizer={name}").optimizer) == options


@pytest.mark.parametrize("name", NAMES)
def test_every_yaml_key_has_its_comment(name):
    for line in (CONF / f"{name}.yaml").read_text().splitlines():
        key = re.match(r"^(\w+):", line)
        if key and key.group(1) not in ("defaults", "name"):
            assert "#" in line.split(":", 1)[1], f"{name}.yaml: {key.group(1)} has no comment"


def test_every_registry_option_is_a_schema_field():
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    for name, spec in OPTIMIZERS.items():
        assert set(spec.defaults) <= fields, (name, set(spec.defaults) - fields)
    for f in dataclasses.fields(OptimizerConfig):  # None = the registry default, except the three keys
        if f.name not in OPTIMIZER_KEYS_NOT_OPTIONS:
            assert f.default is None, f.name


def test_options_left_to_the_registry_stay_overridable(compose_cfg):
    cfg = compose_cfg("optimizer=lamb", "optimizer.eps=1e-8", "optimizer.trust_clip=[0.1,10.0]",
                      "optimizer.betas=[0.8,0.99]")
    assert optimizer_options(cfg.optimizer) == dict(eps=1e-8, trust_clip=[0.1, 10.0], betas=[0.8, 0.99])
    opt = create_optimizer(torch.nn.Linear(2, 2), "lamb", cfg.optimizer.lr, **optimizer_options(cfg.optimizer))
    assert opt.param_groups[0]["eps"] == 1e-8 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    cfg = compose_cfg("optimizer=lars", "optimizer.momentum=0.5", "optimizer.mode=larc")
    opt = create_optimizer(torch.nn.Linear(2, 2), "lars", cfg.optimizer.lr, **optimizer_options(cfg.optimizer))
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["mode"] == "larc"
