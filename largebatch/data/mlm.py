"""Masked-LM sequences: packing and masks drawn per batch with tensor ops.

Masks depend only on (seed, epoch, sample index): the same sample gets the same mask whatever the
batch size, micro-batch, number of ranks or data workers (the sample order is ``largebatch.data.batching``'s).
The randomness is a counter-based hash of (seed, epoch, index, position), so a whole batch is masked
with a few integer tensor ops instead of one generator per sample.

Masking scheme (since the per-batch rewrite; ``MASKING_SCHEME``): BERT's original data pipeline
(google-research/bert ``create_pretraining_data.py``): exactly ``max(1, round(mlm_probability * seq_len))``
positions per sequence, drawn uniformly without replacement from the non-special tokens (19 of 128, 77 of
512; BERT's ``max_predictions_per_seq`` of 20 and 80 never binds at those lengths), each replaced by
[MASK] (80%), a random token (10%) or kept (10%). A fixed count gives the prediction head a static
shape (``masked_positions``: [batch, count], -1 where a sequence has fewer maskable tokens), which is
what lets ``compile=true`` compile once. The previous scheme (``bernoulli-v1``: every non-special token
chosen with probability 0.15 independently, ~19 +- 4 per sequence of 128) masked other tokens: every MLM
number made before the change belongs to that scheme.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from largebatch.data.batching import split_micro
from largebatch.labels import IGNORE_INDEX

MASKING_SCHEME = "bert-fixed-count-v2"  # recorded with results: MLM numbers depend on it
_MASK32 = 0xFFFFFFFF


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


def _mul32(x, c: int):
    """The low 32 bits of x * c for 32-bit x (ints or int64 tensors), without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A bijective 32-bit mixer (Wellons' lowbias32), on Python ints or int64 tensors of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(seed: int, epoch: int, indices: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """24 random bits per (sample, counter): int64 [len(indices), counters.shape[1]], a function of
    (seed, epoch, index, counter) alone. ``counters``: int64 [1 or len(indices), n]."""
    key = _mix32(_mix32(_mix32((seed & _MASK32) ^ 0x9E3779B9) ^ ((seed >> 32) & _MASK32)) ^ (epoch & _MASK32))
    per_sample = _mix32((indices.long() & _MASK32) ^ key).view(-1, 1)
    return _mix32(per_sample ^ _mix32(counters + 0x632BE5AB)) >> 8


def masked_count(length: int, mlm_probability: float) -> int:
    """Positions masked per sequence: BERT's ``max(1, round(length * masked_lm_prob))``."""
    return min(length, max(1, round(mlm_probability * length)))


def mask_batch(ids: torch.Tensor, indices: torch.Tensor, *, seed: int, epoch: int, mask_id: int,
               special_ids: torch.Tensor, vocab_size: int, mlm_probability: float) -> dict:
    """BERT's masking of a batch of sequences [batch, length] (see the module docstring).

    Returns ``input_ids`` (masked), ``labels`` (the original token where masked, else IGNORE_INDEX) and
    ``masked_positions`` ([batch, count]: the masked positions, ascending, with -1 in the slots of a
    sequence that has fewer maskable tokens than ``count``)."""
    ids = ids.long()
    length = ids.shape[1]
    count = masked_count(length, mlm_probability)
    position = torch.arange(length, dtype=torch.int64).view(1, length)
    maskable = ~torch.isin(ids, special_ids)
    # Distinct scores (random bits, then the position) rank the maskable tokens; the others rank last.
    score = torch.where(maskable, hash_bits(seed, epoch, indices, position) * length + position,
                        (1 << 40) + position)
    picked = torch.topk(score, count, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    valid = maskable.gather(1, picked)
    # Which replacement (counters past the first stream): [MASK] 80%, a random token 10%, kept 10%.
    u = hash_bits(seed, epoch, indices, length + picked).double() / (1 << 24)
    random_tokens = (hash_bits(seed, epoch, indices, 2 * length + picked).double() / (1 << 24) * vocab_size).long()
    original = ids.gather(1, picked)
    replaced = torch.where(u < 0.8, mask_id, torch.where(u < 0.9, random_tokens, original))
    inputs = ids.scatter(1, picked, torch.where(valid, replaced, original))
    labels = torch.full_like(ids, IGNORE_INDEX).scatter(1, picked, torch.where(valid, original, IGNORE_INDEX))
    return {"input_ids": inputs, "labels": labels, "masked_positions": torch.where(valid, picked, -1)}


class MaskedLMDataset(Dataset):
    """Packed sequences, masked when read (see the module docstring). ``dataset[i]`` is one sample;
    ``dataset.__getitems__(indices)``, which a DataLoader calls for a whole batch, masks them at once and
    returns ONE dict of batched tensors (collate it with :func:`split_micro_batches`)."""

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

    def __getitems__(self, indices: list[int]) -> dict:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return mask_batch(self.sequences[index], index, seed=self.seed, epoch=self.epoch, mask_id=self.mask_id,
                          special_ids=self.special_ids, vocab_size=self.vocab_size,
                          mlm_probability=self.mlm_probability)

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def split_micro_batches(batch: dict, micro_batch: int) -> list[dict]:
    """One step's masked batch (from ``__getitems__``) -> its micro-batches, in order."""
    return [{k: v[part] for k, v in batch.items()} for part in split_micro(len(batch["input_ids"]), micro_batch)]
