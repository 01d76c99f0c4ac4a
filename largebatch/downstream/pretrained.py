"""A pretraining run's checkpoint as the start of a fine-tune: its encoder weights, or a seeded random init
of the same config (the baseline that shows what pretraining bought)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import BertConfig
from transformers.utils import logging as hf_logging

from largebatch.errors import ConfigError, DataNotFoundError

# The package's name rather than this module's, so the log lines read as they did before the split.
log = logging.getLogger("largebatch.downstream")

INITS = ("pretrained", "random")
# Parameters that an MLM-only checkpoint does not hold: they start fresh even with init="pretrained".
FRESH_PREFIXES = ("bert.pooler.", "classifier.", "qa_outputs.")


def checked_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path, once it is known to hold a saved model (checked before any slow work)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataNotFoundError(
            f"no model in {model_dir} (config.json missing); pass a pretraining run folder whose model/ "
            "holds the checkpoint and tokenizer that lb-train saves at the end of a run"
        )
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise DataNotFoundError(
            f"no weights in {model_dir} (config.json is there, model.safetensors is not): the run that wrote it "
            "did not finish saving; pass the model/ folder of a finished lb-train run"
        )
    return model_dir


def load_model(model_dir: str | Path, model_class, init: str, seed: int, **config_overrides):
    """``model_class`` from ``model_dir``'s config: its encoder weights (``init="pretrained"``) or fresh,
    seeded ones (``init="random"``). Refuses a checkpoint whose encoder did not load, because
    ``from_pretrained`` silently falls back to a random init on a key-prefix mismatch."""
    model_dir = checked_model_dir(model_dir)
    if init not in INITS:
        raise ConfigError(f"init={init!r}; choose one of {INITS}")
    torch.manual_seed(seed)  # the fresh head (and, for "random", everything) is seeded
    if init == "random":
        return model_class(BertConfig.from_pretrained(model_dir, **config_overrides))
    model, info = _from_pretrained_quietly(model_class, model_dir, **config_overrides)
    missing = [k for k in info["missing_keys"] if not k.startswith(FRESH_PREFIXES)]
    if missing or info.get("mismatched_keys"):
        raise ConfigError(
            f"the checkpoint in {model_dir} does not fit {model_class.__name__}: missing {missing[:5]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:5]}"
        )
    _check_one_encoder_tensor(model, model_dir, model_class)
    log.info("%s: encoder loaded from %s; fresh: %s", model_class.__name__, model_dir,
             sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]}))
    return model


def _from_pretrained_quietly(model_class, model_dir: Path, **config_overrides):
    """``from_pretrained`` with its loading info. transformers prints a warning table for the MLM head left
    out and the fresh head; the checks in :func:`load_model` are what matters, so its output is muted."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(model_dir, output_loading_info=True, **config_overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_one_encoder_tensor(model, model_dir: Path, model_class) -> None:
    """Belt and braces beside the key check: one encoder tensor must equal the file's."""
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    name = "bert.embeddings.word_embeddings.weight"
    with safe_open(weights, "pt") as f:
        if name in f.keys() and not torch.equal(f.get_tensor(name), model.state_dict()[name]):
            raise ConfigError(f"{name} in {model_dir} did not load into {model_class.__name__}")
