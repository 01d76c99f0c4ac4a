"""Word-level LSTM language models of Zaremba, Sutskever & Vinyals 2014 ("Recurrent Neural Network
Regularization", arXiv 1409.2329), the PTB baselines that LEGW (arXiv 1901.08256) scales.

Embedding -> stacked LSTM -> linear softmax, all weights uniform(-init_range, init_range); dropout on
the non-recurrent connections only (the embedding output, between layers, before the softmax), as in
the paper. Output weights are untied as in the paper (``tie_weights`` ties them, Press & Wolf 2017).

Deviation, named: torch's LSTM has two bias vectors per gate (input and recurrent) where the paper's
and TensorFlow's cells have one; the recurrent bias is zeroed and frozen so the gate bias has the
paper's init and the same learning rate as every other weight.

The forward takes the hidden state of the previous window (truncated BPTT) and returns the new one;
the loss is SUMMED over the window's tokens (the trainer normalises it: Zaremba's and the TensorFlow
tutorial's loss is the window's token losses summed and averaged over the batch of streams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import ConfigError


@dataclass(frozen=True)
class LMShape:
    layers: int
    hidden: int
    dropout: float
    init_range: float
    bptt: int


# Zaremba et al. 2014, section 4.1 (small: no dropout; medium and large: dropout, 35-step unrolls).
ZAREMBA_SIZES = {
    "small": LMShape(layers=2, hidden=200, dropout=0.0, init_range=0.1, bptt=20),
    "medium": LMShape(layers=2, hidden=650, dropout=0.5, init_range=0.05, bptt=35),
    "large": LMShape(layers=2, hidden=1500, dropout=0.65, init_range=0.04, bptt=35),
}


def lm_shape(model_cfg) -> LMShape:
    """The size's shape, with every key the config sets explicitly taking its place."""
    if model_cfg.size not in ZAREMBA_SIZES:
        raise ConfigError(f"model.size={model_cfg.size!r} is not an LSTM LM size; choose one of {list(ZAREMBA_SIZES)}")
    base = ZAREMBA_SIZES[model_cfg.size]
    shape = LMShape(**{k: getattr(model_cfg, k) if getattr(model_cfg, k) is not None else getattr(base, k)
                       for k in LMShape.__dataclass_fields__})
    for key in ("layers", "hidden", "bptt"):
        if getattr(shape, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(shape, key)}")
    if not shape.init_range > 0:
        raise ConfigError(f"model.init_range must be > 0, got {shape.init_range}")
    if not 0 <= shape.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {shape.dropout}")
    return shape


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, shape: LMShape, tie_weights: bool = False):
        super().__init__()
        self.shape = shape
        self.embedding = nn.Embedding(vocab_size, shape.hidden)
        self.lstm = nn.LSTM(shape.hidden, shape.hidden, num_layers=shape.layers, dropout=shape.dropout,
                            batch_first=True)
        self.drop = nn.Dropout(shape.dropout)
        self.decoder = nn.Linear(shape.hidden, vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -shape.init_range, shape.init_range)
        for layer in range(shape.layers):  # one bias per gate, as the paper's cell (see the docstring)
            recurrent_bias = getattr(self.lstm, f"bias_hh_l{layer}")
            nn.init.zeros_(recurrent_bias)
            recurrent_bias.requires_grad_(False)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, state=None) -> dict:
        """inputs, targets: [streams, window] token ids; state: (h, c) of the previous window or None."""
        hidden, state = self.lstm(self.drop(self.embedding(inputs)), state)
        logits = self.decoder(self.drop(hidden)).float()
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return {"loss_sum": loss_sum, "count": targets.numel(), "state": state}
