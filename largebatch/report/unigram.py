"""The floor every masked-LM run must clear: guess each masked token from unigram frequencies alone.

p(t) = (count_train(t) + 1) / (N + V) over the V ids of the vocabulary that are not special tokens
(add-one / Laplace smoothing, so an eval token never seen in training still gets a finite loss; N is
the number of non-special training tokens). The loss is the mean of -ln p(target) over the masked eval
targets; the accuracy is the share of targets equal to the most frequent training token (ties: the
smallest id). A model whose eval loss is not below this has learned nothing beyond token frequencies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from largebatch.runfolder import CONFIG, SUMMARY, read_json, read_plan

IGNORE_INDEX = -100  # label of unmasked positions (largebatch.models.bert.IGNORE_INDEX)


def _ids(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.reshape(-1).long()


def unigram_baseline(train_labels_or_token_ids, eval_targets, *, vocab_size: int | None = None,
                     exclude_ids=()) -> dict:
    """Cross-entropy (nats) and accuracy of the smoothed training unigram on ``eval_targets``.

    Both inputs may be tensors or nested lists of ids; negative ids (the -100 of unmasked label
    positions) are dropped. ``exclude_ids`` (special tokens) are neither counted nor predicted.
    ``vocab_size`` defaults to the largest id seen + 1.
    """
    train, targets = _ids(train_labels_or_token_ids), _ids(eval_targets)
    train, targets = train[train >= 0], targets[targets >= 0]
    if targets.numel() == 0:
        raise ValueError("no eval targets (every label is -100)")
    if vocab_size is None:
        vocab_size = int(max(train.max().item() if train.numel() else 0, targets.max().item())) + 1
    excluded = torch.zeros(vocab_size, dtype=torch.bool)
    excluded[[i for i in exclude_ids if 0 <= i < vocab_size]] = True
    if excluded[targets].any():
        raise ValueError("an eval target is an excluded (special) id; masked targets never are")
    counts = torch.bincount(train, minlength=vocab_size).double()
    counts[excluded] = 0
    support = int((~excluded).sum())
    probs = (counts + 1) / (counts.sum() + support)
    probs[excluded] = 0
    best = int(torch.argmax(torch.where(excluded, -1.0, counts)))  # first maximum: the smallest id on ties
    return {"loss": float(-torch.log(probs[targets]).mean()), "accuracy": float((targets == best).double().mean()),
            "eval_tokens": int(targets.numel()), "train_tokens": int(counts.sum()), "vocab": support}


def unigram_baseline_from_data(data, max_eval_samples: int | None = None, split: str = "eval") -> dict:
    """From a :class:`largebatch.data.MLMData`: its training sequences and the fixed masks of its ``split``
    ("eval": validation, or "test"), limited to the first ``max_eval_samples`` sequences when the runs scored
    only those (eval_max_batches)."""
    held = getattr(data, split)
    count = len(held) if max_eval_samples is None else min(len(held), max_eval_samples)
    labels = torch.cat([held[i]["labels"].reshape(-1) for i in range(count)])
    targets = labels[labels != IGNORE_INDEX]
    return unigram_baseline(data.train.sequences, targets, vocab_size=len(data.tokenizer),
                            exclude_ids=data.tokenizer.all_special_ids)


def unigram_baseline_from_run(run_dir: Path) -> dict:
    """Rebuild (or load from the cache) the data a run's config.yaml defines and score the unigram on exactly
    the held-out tokens that run scored: the eval sequences at its last stage's sequence length, the first
    ``eval_max_batches x eval_batch`` of them (all when eval_max_batches is null), with their fixed masks, as
    ``largebatch.tasks.base.evaluate_samples`` takes them (the same whatever the world size or micro-batch).
    ``run_eval_tokens``: the run's own eval/tokens (summary.json); ``matches_run_eval_tokens`` whether the two
    counts are equal (None without a summary)."""
    from omegaconf import OmegaConf

    from largebatch.data import build_mlm_data

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG}")
    cfg = OmegaConf.load(run_dir / CONFIG)
    plan = read_plan(run_dir)
    seq_len = plan[-1]["seq_len"] if plan else cfg.data.seq_len
    data = build_mlm_data(cfg.data, cfg.model.vocab_size, seq_len, cfg.seed)
    result = unigram_baseline_from_data(data, eval_limit(cfg))
    if data.test is not None:  # the test split's own floor: verdicts that read test compare with it
        result["test"] = unigram_baseline_from_data(data, eval_limit(cfg), "test")
    run_tokens = (read_json(run_dir / SUMMARY) or {}).get("eval/tokens")
    return {**result, "seq_len": seq_len, "source": str(run_dir), "run_eval_tokens": run_tokens,
            "matches_run_eval_tokens": None if run_tokens is None else run_tokens == result["eval_tokens"]}


def eval_limit(cfg) -> int | None:
    """How many held-out sequences a run of ``cfg`` evaluates: eval_max_batches x eval_batch (None: all), the
    limit of ``evaluate_samples``."""
    max_batches = cfg.get("eval_max_batches")
    return None if max_batches is None else int(max_batches) * int(cfg.eval_batch)
