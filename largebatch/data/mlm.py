"""Masked-LM sequences and the batch order of a large-batch run.

Two properties make batch-size comparisons honest:
- masks depend only on (seed, epoch, sample index): the same sample gets the same mask whatever the
  batch size, micro-batch or number of ranks;
- the sample order is one seeded permutation per epoch, independent of the batch: a batch ladder
  sees the same samples in the same order and differs only in how they are grouped into steps.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from largebatch.models.bert import IGNORE_INDEX


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


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


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
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))
        u = torch.rand((3, ids.numel()), generator=g)
        chosen = (u[0] < self.mlm_probability) & ~torch.isin(ids, self.special_ids)
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        inputs = ids.clone()
        inputs[chosen & (u[1] < 0.8)] = self.mask_id
        randomised = chosen & (u[1] >= 0.8) & (u[1] < 0.9)
        random_tokens = (u[2] * self.vocab_size).long()
        inputs[randomised] = random_tokens[randomised]
        return {"input_ids": inputs, "labels": labels}


class GlobalBatchSampler:
    """Yields, for one rank, the index lists of its micro-batches, step after step.

    Step s of epoch e takes the global batch perm_e[s*B:(s+1)*B] of a permutation seeded by
    (seed, e); rank r takes the r-th contiguous slice of it and cuts it into micro-batches.
    The tail of an epoch that does not fill a global batch is dropped.
    """

    def __init__(self, num_samples: int, batch: int, micro_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0):
        assert batch % (micro_batch * world_size) == 0, "checked by the plan"
        self.num_samples, self.batch, self.micro_batch = num_samples, batch, micro_batch
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_samples // self.batch) * (self.batch // (self.micro_batch * self.world_size))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        per_rank = self.batch // self.world_size
        for step in range(self.num_samples // self.batch):
            mine = perm[step * self.batch + self.rank * per_rank:][:per_rank]
            yield from (chunk.tolist() for chunk in mine.split(self.micro_batch))
