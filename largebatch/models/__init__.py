"""Model factory. Every model's forward takes a batch dict and returns
{"loss_sum", "count", "correct"?}: summed loss over the batch's ``count`` targets, so the trainer can
normalise by the global count."""

from __future__ import annotations

from torch import nn

from largebatch.errors import ConfigError

MODELS = ("bert",)


def build_model(model_cfg, vocab_size: int, max_seq_len: int) -> nn.Module:
    if model_cfg.name == "bert":
        from largebatch.models.bert import build_bert

        max_pos = max(model_cfg.max_position_embeddings, max_seq_len)
        return build_bert(model_cfg.size, vocab_size, model_cfg.dropout, max_pos)
    raise ConfigError(f"model={model_cfg.name!r} is unknown; choose one of {list(MODELS)}")
