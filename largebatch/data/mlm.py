"""Masked-LM sequences: packing and per-sample masks.

Masks depend only on (seed, epoch, sample index): the same sample gets the same mask whatever the
batch size, micro-batch or number of ranks (the sample order is ``largebatch.data.steps``'s).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from largebatch.data.steps import sample_seed
from largebatch.labels import IGNORE_INDEX


def pack_sequences(token_ids: list[list[int]], seq_len: int, cls_id: int, sep_id: int) -> torch.Tensor:
    """Concatenate documents (each followed by [SEP]) and cut [CLS] + (seq_len-2 tokens) + [SEP] rows.
    The incomplete tail is dropped, so every row is full and needs no attention mask."""
    body = seq_len - 2
    stream = torch.tensor([t for doc in token_ids for t in (*doc, sep_id)], dtype=torch.int32)
    rows = stream.numel() // body
    chunks = stream[: rows * body].view(rows, body)
    cls = torch.full((rows, 1), cls_id, dtype=torch.int32)
    sep = torch.full((rows, 1), sep_id, dtype=torch.int32)
    return torch.cat([cls, chunks, sep], dim=1)


class MaskedLMDataset(Dataset):
    """BERT masking (Devlin et al. 2019): ``mlm_probability`` of the non-special tokens are chosen;
    80% of them become [MASK], 10% a random token, 10% stay; only chosen tokens carry a label."""

    def __init__(self, sequences: torch.Tensor, *, mask_id: int, special_ids: list[int], vocab_size: int,
                 mlm_probability: float = 0.15, seed: int = 0):
        self.sequences = sequences
        self.mask_id = mask_id
        self.special_ids = torch.tensor(special_ids)
        self.vocab_size = vocab_size
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict:
        ids = self.sequences[index].long()
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        u = torch.rand((3, ids.numel()), generator=g)
        chosen = (u[0] < self.mlm_probability) & ~torch.isin(ids, self.special_ids)
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        inputs = ids.clone()
        inputs[chosen & (u[1] < 0.8)] = self.mask_id
        randomised = chosen & (u[1] >= 0.8) & (u[1] < 0.9)
        random_tokens = (u[2] * self.vocab_size).long()
        inputs[randomised] = random_tokens[randomised]
        return {"input_ids": inputs, "labels": labels}
