"""SQuAD v1.1 fine-tune (the paper-scale downstream score, LAMB's Table 1): windowing the contexts and
decoding answer spans from the start/end logits.

Devlin et al.'s 3 epochs, lr 5e-5, batch 32, windows of 384 tokens overlapping by 128 (the Hugging Face
``stride``, not Google's step between windows), the best valid span (end >= start, at most 30 tokens,
inside the context) over the 20 best starts x ends of each window, maximised over windows, scored with the
official v1.1 definitions (``squad_metrics``). The rest of the recipe is :mod:`.finetune`'s.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import BertForQuestionAnswering, BertTokenizerFast

from largebatch.data.squad import load_squad, squad_metrics
from largebatch.downstream.finetune import fit, predict, recipe_of, resolve_device, torch_threads
from largebatch.downstream.pretrained import checked_model_dir, load_model


def squad_features(tokenizer, examples: list[dict], max_seq_len: int, doc_stride: int, train: bool):
    """Windows over each (question, context): tensors for the model, the example index of each window and
    (eval) each token's character span in the context, None outside it. Training windows that do not
    contain the whole answer point at [CLS] (token 0), as in BERT's run_squad."""
    enc = tokenizer([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
                    truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    example_of = list(enc["overflow_to_sample_mapping"])
    offsets, starts, ends = [], [], []
    for i, window in enumerate(enc["offset_mapping"]):
        in_context = [s == 1 for s in enc.sequence_ids(i)]
        offsets.append([tuple(o) if c else None for o, c in zip(window, in_context)])
        if train:
            example = examples[example_of[i]]
            first = example["answer_starts"][0]
            last = first + len(example["answers"][0])  # exclusive
            tokens = [t for t, c in enumerate(in_context)
                      if c and window[t][0] < last and window[t][1] > first]
            whole = tokens and window[tokens[0]][0] <= first and window[tokens[-1]][1] >= last
            starts.append(tokens[0] if whole else 0)
            ends.append(tokens[-1] if whole else 0)
    keys = ("input_ids", "token_type_ids", "attention_mask")
    data = {k: torch.tensor(enc[k]) for k in keys if k in enc}
    if train:
        data["start_positions"], data["end_positions"] = torch.tensor(starts), torch.tensor(ends)
    return data, example_of, offsets


def best_span(start_logits, end_logits, offsets, max_answer_len: int = 30, n_best: int = 20):
    """(score, first char, end char) of the best valid span of one window, or None when none is valid:
    both ends inside the context, end >= start, at most ``max_answer_len`` tokens."""
    start_logits, end_logits = torch.as_tensor(start_logits).float(), torch.as_tensor(end_logits).float()
    k = min(n_best, len(start_logits))
    best = None
    for s in start_logits.topk(k).indices.tolist():
        for e in end_logits.topk(k).indices.tolist():
            if offsets[s] is None or offsets[e] is None or not 0 <= e - s < max_answer_len:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


def squad_predictions(examples, example_of, offsets, start_logits, end_logits, max_answer_len=30, n_best=20):
    """{question id: answer text}: each question's best span over all of its windows ("" if none)."""
    best: dict[int, tuple] = {}
    for i, example_index in enumerate(example_of):
        span = best_span(start_logits[i], end_logits[i], offsets[i], max_answer_len, n_best)
        if span is not None and (example_index not in best or span[0] > best[example_index][0]):
            best[example_index] = span
    return {e["id"]: (e["context"][best[j][1] : best[j][2]] if j in best else "")
            for j, e in enumerate(examples)}


def finetune_squad(
    model_dir: str | Path,
    train_file: str | Path,
    dev_file: str | Path,
    *,
    init: str = "pretrained",
    seed: int = 0,
    epochs: float = 3.0,
    lr: float = 5e-5,
    batch: int = 32,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_answer_len: int = 30,
    n_best: int = 20,
    max_train: int | None = None,
    max_eval: int | None = None,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    threads: int | None = None,
    device: str | None = None,
) -> dict:
    """Fine-tune on SQuAD v1.1 ``train_file``; F1 and exact match (0-100) on ``dev_file``, plus the
    predictions."""
    recipe = recipe_of(locals())
    recipe.update(train_file=str(train_file), dev_file=str(dev_file))
    start = time.perf_counter()
    model_dir = checked_model_dir(model_dir)
    train, dev_examples = load_squad(train_file)[:max_train], load_squad(dev_file)[:max_eval]
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    dev = resolve_device(device)
    with torch_threads(threads):
        model = load_model(model_dir, BertForQuestionAnswering, init, seed)
        train_data, _, _ = squad_features(tokenizer, train, max_seq_len, doc_stride, train=True)
        steps = fit(model, train_data, epochs=epochs, batch=batch, lr=lr, warmup_fraction=warmup_fraction,
                    weight_decay=weight_decay, seed=seed, device=dev)
        data, example_of, offsets = squad_features(tokenizer, dev_examples, max_seq_len, doc_stride,
                                                   train=False)
        starts, ends = [], []
        for _, out in predict(model, data, 2 * batch, dev):
            starts.extend(out.start_logits.float().cpu())
            ends.extend(out.end_logits.float().cpu())
    predictions = squad_predictions(dev_examples, example_of, offsets, starts, ends, max_answer_len, n_best)
    return {"task": "squad_v1.1", "init": init, **squad_metrics(predictions, dev_examples),
            "train_examples": len(train), "train_windows": len(train_data["input_ids"]),
            "eval_examples": len(dev_examples), "eval_windows": len(example_of), "steps": steps,
            "seconds": round(time.perf_counter() - start, 2), "recipe": recipe, "predictions": predictions}
