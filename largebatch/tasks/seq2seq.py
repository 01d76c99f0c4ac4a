"""Translation with a GNMT-style encoder-decoder (LEGW's GNMT workload).

Training: teacher forcing; the loss of a micro-batch is the SUM of its target tokens' cross-entropies
(label smoothing optional) and the step divides it by a GLOBAL count (``model.normalise_by``):
``sentences`` is tensorflow/nmt's loss, GNMT's reference (token losses summed per sentence, averaged over
the batch of sentences), the one its SGD lr 1.0 and clip 5 refer to; ``tokens`` is the per-token mean
(fairseq's convention), which makes the gradient ~mean-target-length times smaller. Either way any split
of a step over micro-batches and ranks gives the same gradient. Sample order is
``largebatch.data.batching``'s seeded permutation, the same for every batch size; ``data.bucket`` sorts a
rank's share of each step by length before cutting micro-batches (same samples per step, less padding).

Evaluation, every ``eval_every_epochs``: the valid split's per-token loss and perplexity (no label
smoothing) and its greedy BLEU (the primary metric). At the end of training, the test split: loss,
perplexity, BLEU and chrF of the configured decoder (beam ``model.beam_size``, GNMT's length penalty
``model.length_penalty``), beside the BLEU and chrF of copying the source (what "0" looks like on the
pair); the hypotheses go to ``translations/test.hyp`` and a handful of examples to ``examples.md``.
BLEU and chrF are sacrebleu's, on detokenised text (its default 13a tokenisation).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from largebatch import runfolder
from largebatch.data.batching import STAGE_EPOCH_STRIDE, index_steps
from largebatch.data.parallel import (
    PairDataset,
    ParallelSplits,
    cache_folder,
    collate_pairs,
    decode,
    encode,
    load_or_train_bpe,
    load_parallel,
    pad_pairs,
)
from largebatch.errors import ConfigError
from largebatch.fileio import atomic_write_text
from largebatch.labels import IGNORE_INDEX
from largebatch.tasks.base import Metric, Task, perplexity

log = logging.getLogger(__name__)

NORMALISERS = ("sentences", "tokens")
EXAMPLES = 8  # example translations written to examples.md


@dataclass
class Split:
    pairs: list[tuple[str, str]]  # text (references are NFC-normalised, as the decoder's output)
    dataset: PairDataset


@dataclass
class TranslationData:
    train: PairDataset
    valid: Split
    test: Split
    tokenizer: object
    description: str
    dropped: int  # training pairs longer than data.max_len


class TranslationTask(Task):
    primary = Metric("eval/bleu", higher_is_better=True)
    data_names = ("verses", "parallel_files", "wmt16")

    def __init__(self, cfg):
        super().__init__(cfg)
        m, d = cfg.model, cfg.data
        from largebatch.models.seq2seq import ATTENTIONS

        checks = [
            (m.normalise_by in NORMALISERS, f"model.normalise_by={m.normalise_by!r} is not one of "
                                            f"{' | '.join(NORMALISERS)}"),
            (m.attention in ATTENTIONS, f"model.attention={m.attention!r} is not one of {' | '.join(ATTENTIONS)}"),
            (m.beam_size >= 1, f"model.beam_size={m.beam_size} must be >= 1 (1 is greedy decoding)"),
            (m.length_penalty >= 0, f"model.length_penalty={m.length_penalty} must be >= 0 (0: none)"),
            (m.decode_ratio > 0, f"model.decode_ratio={m.decode_ratio} must be > 0 (the longest output, in source "
                                 "lengths)"),
            (0 <= m.label_smoothing < 1, f"model.label_smoothing={m.label_smoothing} must be in [0, 1)"),
            (m.encoder_layers >= 1 and m.decoder_layers >= 1, "model.encoder_layers and decoder_layers must be >= 1"),
            (d.max_len >= 1, f"data.max_len={d.max_len} must be >= 1"),
            (d.vocab_size > 8, f"data.vocab_size={d.vocab_size} is too small for a subword vocabulary"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._data: TranslationData | None = None

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> TranslationData:
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> TranslationData:
        d = self.cfg.data
        splits: ParallelSplits = load_parallel(d)
        if d.max_train is not None:
            splits.train = splits.train[: d.max_train]
        if not splits.train:
            raise ConfigError(f"no training pairs in {splits.description}")
        tokenizer = load_or_train_bpe(splits, d.vocab_size, cache_folder(d, splits))
        src, tgt = encode(tokenizer, [s for s, _ in splits.train]), encode(tokenizer, [t for _, t in splits.train])
        keep = [i for i in range(len(src)) if 0 < len(src[i]) <= d.max_len and 0 < len(tgt[i]) <= d.max_len]
        train = PairDataset([src[i] for i in keep], [tgt[i] for i in keep])

        def held_out(pairs):
            pairs = pairs[: d.max_eval] if d.max_eval is not None else pairs
            pairs = [(s, unicodedata.normalize("NFC", t)) for s, t in pairs]
            return Split(pairs, PairDataset(encode(tokenizer, [s for s, _ in pairs]),
                                            encode(tokenizer, [t for _, t in pairs])))

        return TranslationData(train, held_out(splits.valid), held_out(splits.test), tokenizer,
                               splits.description, dropped=len(src) - len(keep))

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        if allow_declared and self.cfg.data.train_samples is not None:
            return self.cfg.data.train_samples
        return len(self.data.train)

    def tokens_per_sample(self, seq_len: int | None) -> None:
        return None  # sentences vary in length

    def describe(self) -> dict[str, str]:
        m, d = self.cfg.model, self.cfg.data
        model = (f"seq2seq ({m.encoder_layers}+{m.decoder_layers} LSTM x {m.hidden}, {m.attention} attention, "
                 f"loss per {m.normalise_by[:-1]}, beam {m.beam_size})")
        return {"model": model, "data": f"{d.name} ({d.source}, {d.src_lang} -> {d.tgt_lang}, BPE {d.vocab_size})"}

    # ------------------------------------------------------------------ model and training
    def build_model(self):
        from largebatch.models.seq2seq import GNMT, Seq2seqShape

        m = self.cfg.model
        # the trained vocabulary where the data is loaded; its configured size for a plan (lb-plan)
        vocab = self._data.tokenizer.get_vocab_size() if self._data else self.cfg.data.vocab_size
        try:
            return GNMT(Seq2seqShape(vocab_size=vocab, hidden=m.hidden, embed=m.embed or m.hidden,
                                     encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
                                     attention=m.attention, residual_from=m.residual_from, dropout=m.dropout,
                                     init_range=m.init_range, tie_embeddings=m.tie_embeddings,
                                     pass_hidden_state=m.pass_hidden_state, label_smoothing=m.label_smoothing))
        except ValueError as error:
            raise ConfigError(f"model: {error}") from error

    def steps(self, plan, *, stage_index, rank, world_size, start_step=0):
        return index_steps(self.data.train, plan, rank=rank, world_size=world_size, seed=self.cfg.seed,
                           num_workers=self.cfg.data.num_workers, first_epoch=STAGE_EPOCH_STRIDE * stage_index,
                           start_step=start_step, collate=partial(collate_pairs, bucket=self.cfg.data.bucket))

    def normaliser(self, micro_batch):
        if self.cfg.model.normalise_by == "sentences":
            return micro_batch["src"].shape[0]
        return int((micro_batch["tgt_out"] != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, accelerator, plan) -> dict:
        valid = self.data.valid
        limit = None if self.cfg.eval_max_batches is None else self.cfg.eval_max_batches * self.cfg.eval_batch
        result = self._loss(model, accelerator, valid.dataset, "eval", limit)
        hyps = self._translate(model, accelerator, valid.dataset, beam=1, limit=limit)
        refs = [t for _, t in valid.pairs[: len(hyps)]]
        result.update(_scores("eval", hyps, refs))
        return result

    def final_evaluate(self, model, accelerator, plan, run_dir: Path) -> dict:
        test, m = self.data.test, self.cfg.model
        result = self._loss(model, accelerator, test.dataset, "test", None)
        hyps = self._translate(model, accelerator, test.dataset, beam=m.beam_size, limit=None)
        sources, refs = [s for s, _ in test.pairs], [t for _, t in test.pairs]
        result.update(_scores("test", hyps, refs, decoder=f"beam {m.beam_size}, length penalty {m.length_penalty}"))
        result.update(_scores("test/copy_source", sources, refs))
        if accelerator.is_main_process:
            atomic_write_text(Path(run_dir) / "translations" / "test.hyp", "".join(h + "\n" for h in hyps))
            lines = [f"# Example translations (test split, {result['test/decoder']})", ""]
            for s, r, h in list(zip(sources, refs, hyps))[:EXAMPLES]:
                lines += [f"- source:     {s}", f"  reference:  {r}", f"  hypothesis: {h}", ""]
            atomic_write_text(Path(run_dir) / runfolder.EXAMPLES, "\n".join(lines))
        return result

    def _eval_batches(self, dataset: PairDataset, limit: int | None, accelerator) -> list[list[int]]:
        """This rank's batches of the first ``limit`` pairs. The pairs are sorted by source length (less
        padding) and cut into batches of ``eval_batch`` the same way for every world size; rank r takes
        batches r, r + world, ... So a batch, and the longest output it allows (``decode_ratio`` x its
        longest source), do not depend on the number of ranks."""
        n = len(dataset) if limit is None else min(limit, len(dataset))
        order = sorted(range(n), key=lambda i: len(dataset.src[i]))
        batches = [order[i:i + self.cfg.eval_batch] for i in range(0, n, self.cfg.eval_batch)]
        return batches[accelerator.process_index::accelerator.num_processes]

    @torch.no_grad()
    def _loss(self, model, accelerator, dataset: PairDataset, prefix: str, limit: int | None) -> dict:
        """Per-token cross-entropy (no label smoothing) of the first ``limit`` pairs, sharded over ranks."""
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for indices in self._eval_batches(dataset, limit, accelerator):
            batch = pad_pairs([dataset[i] for i in indices])
            with accelerator.autocast():
                out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
            totals += torch.tensor([out["loss_sum"].item(), out["count"]], dtype=torch.float64, device=totals.device)
        model.train()
        loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
        loss = loss_sum / max(count, 1)
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": perplexity(loss), f"{prefix}/tokens": int(count)}

    @torch.no_grad()
    def _translate(self, model, accelerator, dataset: PairDataset, beam: int, limit: int | None) -> list[str]:
        """Detokenised translations of the first ``limit`` sources, in order."""
        from accelerate.utils import gather_object

        net = accelerator.unwrap_model(model)
        net.eval()
        out: list[tuple[int, str]] = []
        for indices in self._eval_batches(dataset, limit, accelerator):
            batch = pad_pairs([dataset[i] for i in indices])
            src, lengths = batch["src"].to(accelerator.device), batch["src_lengths"].to(accelerator.device)
            max_len = max(1, round(self.cfg.model.decode_ratio * int(lengths.max())))
            with accelerator.autocast():
                if beam == 1:
                    ids = net.greedy(src, lengths, max_len)
                else:
                    ids = net.beam_search(src, lengths, beam, self.cfg.model.length_penalty, max_len)
            out += zip(indices, decode(self.data.tokenizer, ids))
        net.train()
        if accelerator.num_processes > 1:
            out = gather_object(out)
        return [text for _, text in sorted(out)]




def _scores(prefix: str, hyps: list[str], refs: list[str], decoder: str | None = None) -> dict:
    import sacrebleu

    result = {f"{prefix}/bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
              f"{prefix}/chrf": sacrebleu.corpus_chrf(hyps, [refs]).score, f"{prefix}/sentences": len(hyps)}
    if decoder:
        result[f"{prefix}/decoder"] = decoder
    return result
