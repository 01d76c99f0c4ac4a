"""BERT masked-LM pretraining (LAMB's workload): WordPiece on the bundled or paper corpus, packed sequences.

The loss is summed over masked tokens and normalised by the GLOBAL number of masked tokens of the
step (the reference's per-token mean, made exact under accumulation and ranks). Masks are a function
of (seed, epoch, sample), so every batch size and split sees the same masks; a whole step is masked at
once with tensor ops (``largebatch.data.mlm``), in data-loader workers on CUDA (``data.num_workers=auto``).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from largebatch.data import MLMData, build_mlm_data
from largebatch.data.batching import STAGE_EPOCH_STRIDE, index_steps
from largebatch.data.mlm import masked_count, split_micro_batches
from largebatch.device import resolve_device_type, resolve_num_workers
from largebatch.labels import IGNORE_INDEX
from largebatch.tasks.base import Metric, Task, evaluate_samples


class MaskedLMTask(Task):
    primary = Metric("eval/loss", higher_is_better=False)
    data_names = ("bundled", "text_files", "hub")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._data: dict[int, MLMData] = {}

    def data(self, seq_len: int) -> MLMData:
        if seq_len not in self._data:
            self._data[seq_len] = build_mlm_data(self.cfg.data, self.cfg.model.vocab_size, seq_len, self.cfg.seed)
        return self._data[seq_len]

    def default_seq_len(self) -> int:
        return self.cfg.data.seq_len

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        if allow_declared and self.cfg.data.train_samples is not None:
            return self.cfg.data.train_samples
        return len(self.data(seq_len).train)

    def describe(self) -> dict[str, str]:
        data = self.cfg.data
        return {"model": f"bert-{self.cfg.model.size} (vocab {self.cfg.model.vocab_size})",
                "data": f"{data.name} {list(data.sources or data.files or data.hub_datasets)}"}

    def build_model(self) -> nn.Module:
        from largebatch.models.bert import build_bert

        model_cfg = self.cfg.model
        longest = max([self.cfg.data.seq_len, *(s.seq_len for s in self.cfg.stages if s.seq_len)])
        vocab_size = len(next(iter(self._data.values())).tokenizer) if self._data else model_cfg.vocab_size
        return build_bert(model_cfg.size, vocab_size, model_cfg.dropout,
                          max(model_cfg.max_position_embeddings, longest))

    def steps(self, plan, *, stage_index, rank, world_size, start_step=0):
        workers, pin = resolve_num_workers(self.cfg.data.num_workers, resolve_device_type(self.cfg.device),
                                           int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return index_steps(self.data(plan.seq_len).train, plan, rank=rank, world_size=world_size, seed=self.cfg.seed,
                           num_workers=workers, pin_memory=pin, first_epoch=STAGE_EPOCH_STRIDE * stage_index,
                           start_step=start_step, collate=split_micro_batches)

    def flops_per_sample(self, model, seq_len: int) -> float:
        """Training FLOPs of one sample (largebatch.flops), with the data's fixed number of predictions."""
        from largebatch.flops import bert_flops_per_sample

        return bert_flops_per_sample(model, seq_len, masked_count(seq_len, self.cfg.data.mlm_probability))

    def normaliser(self, micro_batch):
        return (micro_batch["labels"] != IGNORE_INDEX).sum()

    def evaluate(self, model, accelerator, plan) -> dict:
        """eval/: the validation documents; test/: the test documents too where data.test_fraction holds some."""
        data = self.data(plan.seq_len)
        result = {}
        for prefix, dataset in (("eval", data.eval), ("test", data.test)):
            if dataset is not None:
                out = evaluate_samples(model, dataset, self.cfg.eval_batch, accelerator, self.cfg.eval_max_batches)
                result.update({f"{prefix}/loss": out["eval/loss"], f"{prefix}/accuracy": out["eval/accuracy"],
                               f"{prefix}/tokens": out["eval/count"]})
        return result

    def save_model(self, model, folder: Path) -> None:
        model.save_pretrained(folder)
        next(iter(self._data.values())).tokenizer.save_pretrained(folder)
