"""Every option of every config group composes; misspelt keys fail at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import REPO

GROUPS = ["model", "data", "optimizer", "scaling", "schedule", "logger", "scale", "experiment"]
NAME_KEY = {"model": "name", "data": "name", "optimizer": "name", "scaling": "rule", "schedule": "name",
            "logger": "name"}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((REPO / "conf" / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "name"), OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_group_option_composes(compose_cfg, group, name):
    overrides = [f"{group}={name}"]
    if (group, name) == ("data", "text_files"):
        overrides.append("data.files=[corpus.txt]")
    cfg = compose_cfg(*overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in NAME_KEY:  # the file chose what it says it chooses
        assert resolved[group][NAME_KEY[group]] == name
    elif group == "scale":
        assert resolved["scale"] == name
    assert resolved["scaling"]["ref_lr"] == resolved["optimizer"]["lr"] > 0


def test_global_batch_override(compose_cfg):
    assert compose_cfg("batch=32768", "optimizer=adamw", "model=bert").batch == 32768


@pytest.mark.parametrize("override", ["optimizer.lrr=1e-3", "model.sise=base", "batchsize=64", "batch=many",
                                      "model=lstm_lm model.heads=12", "model=bert model.bptt=35",
                                      "data=ptb data.seq_len=64", "data=mnist data.max_tokens=5"])
def test_misspelt_mistyped_or_other_familys_key_fails_at_compose(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(*override.split())


def test_scale_presets_and_user_overrides(compose_cfg):
    tiny = compose_cfg()
    assert (tiny.scale, tiny.model.size, tiny.data.seq_len) == ("tiny", "tiny", 32)
    assert compose_cfg("micro_batch=8").micro_batch == 8  # the command line beats the preset
    paper = compose_cfg("scale=paper")
    assert (paper.model.size, paper.data.seq_len, paper.precision) == ("large", 128, "bf16")


@pytest.mark.parametrize("overrides", [["scale=tiny"], ["scale=tiny", "model=lstm_lm", "data=ptb"], ["scale=small"]])
def test_lb_plan_says_in_one_line_what_a_scale_sets(overrides):
    """`lb-plan scale=...` names the preset files the scale selects and every key they set, with the value the
    composed config holds."""
    from largebatch.cli import scale_settings
    from largebatch.config import compose

    cfg = compose(overrides)
    line = scale_settings(cfg)
    assert f"conf/scale_preset/{cfg.model.name}_{cfg.scale}.yaml" in line
    for part in line.split("; "):
        for setting in part.split(": ", 1)[1].split(", "):
            key, value = setting.split("=", 1)
            assert str(OmegaConf.select(cfg, key)) == value, (key, value)


def _schema_files():
    """(YAML file, its schema dataclass) for train.yaml and every file of a group validated by a schema."""
    import yaml

    from largebatch import config as C

    stored = {"train_schema": C.TrainConfig, **{f"{name}_schema": node for name, node in C.MODELS.items()},
              "text_schema": C.TextDataConfig, "word_corpus_schema": C.WordCorpusConfig,
              "image_schema": C.ImageDataConfig, "translation_schema": C.TranslationDataConfig,
              "schedule_schema": C.ScheduleConfig, "scaling_schema": C.ScalingConfig, "logger_schema": C.LoggerConfig,
              "batch_schedule_schema": getattr(C, "BatchScheduleConfig", None)}
    for path in sorted(C.CONF_DIR.rglob("*.yaml")):
        body = yaml.safe_load(path.read_text()) or {}
        schemas = [d for d in body.get("defaults", []) if isinstance(d, str) and stored.get(d) is not None]
        if schemas:
            yield path, stored[schemas[0]], {k: v for k, v in body.items() if k != "defaults"}


def test_every_default_has_one_home():
    """A default lives in its YAML file (with the comment a user reads) or in its dataclass (config.py), never in
    both: a YAML key whose value equals the dataclass field's default is a second home. Where one file owns a
    schema (train.yaml, each model) or every file of a group sets a key, the YAML holds it and the field is
    MISSING; where files of a group share a default, the dataclass holds it and the files set only what differs."""
    import dataclasses

    twice = []
    for path, schema, body in _schema_files():
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key, value in body.items():
            f = fields.get(key)
            if f is None:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default == value:
                twice.append(f"{path.relative_to(REPO)}: {key}: {value!r}")
    assert not twice, "defaults with two homes (YAML and config.py):\n" + "\n".join(twice)
