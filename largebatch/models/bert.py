"""BERT masked-LM pretraining, built from a ``BertConfig`` (no weights are downloaded).

The MLM prediction head runs only at the masked positions, as in NVIDIA's BERT: the loss is the same
as ``BertForMaskedLM``'s, but the vocabulary projection (the largest matmul of a small BERT) shrinks
from every token to the ~15% that carry a label. Given ``masked_positions`` (a fixed number per
sequence, from the data: BERT's original ``masked_lm_positions``), the head's input has a static shape
[batch, count], so ``torch.compile`` compiles once; without them the positions are found from the
labels (a data-dependent shape). Both give the same loss (tested). Attention runs through PyTorch's
``scaled_dot_product_attention`` (``attn_implementation="sdpa"``: flash / memory-efficient kernels).
The model returns the SUM of the token losses and the token count, so the trainer can normalise by the
global count of masked tokens over all micro-batches and ranks (what makes a large batch split any way
give the same gradient).

Deviation from the LAMB paper's BERT: masked-LM only, no next-sentence prediction (as RoBERTa);
sequences are packed across document boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from largebatch.labels import IGNORE_INDEX

# Standard shapes (Turc et al. 2019 for the small ones; Devlin et al. 2019 for base/large):
# (layers, hidden, heads); the feed-forward width is 4 x hidden.
BERT_SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def bert_config(size: str, vocab_size: int, dropout: float, max_position_embeddings: int = 512) -> BertConfig:
    if size not in BERT_SIZES:
        from largebatch.errors import ConfigError

        raise ConfigError(f"model.size={size!r} is not a BERT size; choose one of {sorted(BERT_SIZES)}")
    layers, hidden, heads = BERT_SIZES[size]
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_position_embeddings,
        attn_implementation="sdpa",
    )


class BertMaskedLM(nn.Module):
    """``BertForMaskedLM`` whose forward computes the head at labelled positions only.

    forward(input_ids, labels[, masked_positions]) -> {"loss_sum", "count", "correct"}: summed
    cross-entropy over the positions where ``labels != -100``, their number, and how many were predicted
    right. ``masked_positions`` ([batch, count], -1 = none) must list exactly those positions.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.mlm = BertForMaskedLM(config)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, masked_positions: torch.Tensor | None = None,
                attention_mask=None) -> dict:
        # Sequences are packed to full length, so no attention mask is needed unless given.
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if masked_positions is None:
            selected = labels != IGNORE_INDEX
            targets = labels[selected]
            logits = self.mlm.cls(hidden[selected]).float()
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            correct = (logits.argmax(-1) == targets).sum()
            return {"loss_sum": loss_sum, "count": targets.numel(), "correct": correct}
        valid = masked_positions >= 0
        at = masked_positions.clamp(min=0)
        targets = torch.where(valid, labels.gather(1, at), IGNORE_INDEX).flatten()
        picked = hidden.gather(1, at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = self.mlm.cls(picked).float().flatten(0, 1)
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & valid.flatten()).sum()
        return {"loss_sum": loss_sum, "count": valid.sum(), "correct": correct}

    def save_pretrained(self, path) -> None:
        self.mlm.save_pretrained(path)


def build_bert(size: str, vocab_size: int, dropout: float, max_position_embeddings: int = 512) -> BertMaskedLM:
    return BertMaskedLM(bert_config(size, vocab_size, dropout, max_position_embeddings))
