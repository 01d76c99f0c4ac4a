"""Sentence classification fine-tune on a bundled task (tweets, wiki_topics): the downstream score where
SQuAD is not available.

The [CLS] token's pooled output feeds a linear classifier (``BertForSequenceClassification``); the pooler
is not part of our MLM-only checkpoint, so it starts fresh in both inits. Sizes: BERT-tiny is fine-tuned
at lr 1e-4 and batch 32, inside the grid the compact BERTs of Turc et al. 2019 were tuned over
(google-research/bert README: lr 3e-4, 1e-4, 5e-5, 3e-5; batch 8..128; 4 epochs), but for 1 epoch over at
most 8,000 tweets at sequence length 64, to stay at about a minute on 2 CPU cores. The rest of the recipe
is :mod:`.finetune`'s.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from largebatch.data.classification import load_classification
from largebatch.downstream.finetune import fit, predict, recipe_of, resolve_device, torch_threads
from largebatch.downstream.pretrained import checked_model_dir, load_model


def finetune_classification(
    model_dir: str | Path,
    *,
    task: str = "tweets",
    init: str = "pretrained",
    seed: int = 0,
    epochs: float = 1.0,
    lr: float = 1e-4,
    batch: int = 32,
    seq_len: int = 64,
    max_train: int | None = 8000,
    max_eval: int | None = 2000,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    threads: int | None = None,
    device: str | None = None,
) -> dict:
    """Fine-tune ``model_dir``'s BERT on a bundled classification task; eval accuracy (0-1) and loss."""
    recipe = recipe_of(locals())
    start = time.perf_counter()
    model_dir = checked_model_dir(model_dir)
    train, evaluation, label_names = load_classification(task, seed=0)  # the split is fixed, not the seed
    train, evaluation = train[:max_train], evaluation[:max_eval]
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    dev = resolve_device(device)

    def encode(examples):
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=seq_len, padding="max_length",
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in examples])}

    with torch_threads(threads):
        model = load_model(model_dir, BertForSequenceClassification, init, seed, num_labels=len(label_names))
        steps = fit(model, encode(train), epochs=epochs, batch=batch, lr=lr, warmup_fraction=warmup_fraction,
                    weight_decay=weight_decay, seed=seed, device=dev)
        correct, loss_sum = 0, 0.0
        for inputs, out in predict(model, encode(evaluation), 2 * batch, dev):
            correct += int((out.logits.argmax(-1) == inputs["labels"]).sum())
            loss_sum += float(out.loss) * len(inputs["labels"])
    return {"task": task, "init": init, "accuracy": correct / len(evaluation),
            "eval_loss": loss_sum / len(evaluation), "train_examples": len(train),
            "eval_examples": len(evaluation), "labels": label_names, "steps": steps,
            "seconds": round(time.perf_counter() - start, 2), "recipe": recipe}
