"""Downstream evaluation of a pretrained checkpoint: one fixed fine-tuning recipe, reported beside the
same recipe from a random initialisation (what pretraining bought).

    lb-finetune RUN_DIR [RUN_DIR ...] [--task tweets] [--random-init] [--squad-train F --squad-dev F]

Recipe (BERT fine-tuning, Devlin et al. 2019, sec. 4 and A.3): AdamW (betas 0.9/0.999, eps 1e-6),
weight decay 0.01 except biases and LayerNorm, linear warmup over the first 10% of the steps then linear
decay to 0, dropout as in pretraining, the [CLS] token's pooled output feeding a linear classifier
(``BertForSequenceClassification``). The pooler is not part of our MLM-only checkpoint, so it starts
fresh in both inits. Sizes: BERT-tiny is fine-tuned at lr 1e-4 and batch 32, inside the grid the compact
BERTs of Turc et al. 2019 were tuned over (google-research/bert README: lr 3e-4, 1e-4, 5e-5, 3e-5; batch
8..128; 4 epochs), but for 1 epoch over at most 8,000 tweets at sequence length 64, to stay at about a
minute on 2 CPU cores. One fixed recipe, no per-checkpoint search, so the comparison across pretraining
batch sizes is not confounded by tuning.
SQuAD v1.1 (the paper-scale path, LAMB's Table 1): Devlin et al.'s 3 epochs, lr 5e-5, batch 32, windows
of 384 tokens overlapping by 128 (the Hugging Face ``stride``, not Google's step between windows), the
best valid span (end >= start, at most 30 tokens, inside the context) over the 20 best starts x ends of
each window, maximised over windows, scored with the official v1.1 definitions (``squad_metrics``).
Training runs in fp32 on CPU and in bf16 autocast on a GPU, without gradient accumulation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertTokenizerFast,
)
from transformers.utils import logging as hf_logging

from largebatch.data.classification import load_classification
from largebatch.data.squad import load_squad, squad_metrics
from largebatch.errors import ConfigError, DataNotFoundError, LargebatchError, fail
from largebatch.optim.param_groups import build_param_groups
from largebatch.sched.schedules import build_schedule
from largebatch.sched.steps import epochs_to_steps, steps_per_epoch

log = logging.getLogger("largebatch.downstream")

INITS = ("pretrained", "random")
# Parameters that an MLM-only checkpoint does not hold: they start fresh even with init="pretrained".
_FRESH_PREFIXES = ("bert.pooler.", "classifier.", "qa_outputs.")


# ---------------------------------------------------------------------------- model loading
def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise DataNotFoundError(
            f"no model in {model_dir} (config.json missing); pass a pretraining run folder whose model/ "
            "holds the checkpoint and tokenizer that lb-train saves at the end of a run"
        )


def load_model(model_dir: str | Path, model_class, init: str, seed: int, **config_overrides):
    """``model_class`` from ``model_dir``'s config: its encoder weights (``init="pretrained"``) or fresh,
    seeded ones (``init="random"``). Refuses a checkpoint whose encoder did not load, because
    ``from_pretrained`` silently falls back to a random init on a key-prefix mismatch."""
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    if init not in INITS:
        raise ConfigError(f"init={init!r}; choose one of {INITS}")
    torch.manual_seed(seed)  # the fresh head (and, for "random", everything) is seeded
    if init == "random":
        return model_class(BertConfig.from_pretrained(model_dir, **config_overrides))
    # transformers prints a warning table for the MLM head left out and the fresh head; the checks below
    # are what matters, so keep the output to one log line.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(model_dir, output_loading_info=True, **config_overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info["missing_keys"] if not k.startswith(_FRESH_PREFIXES)]
    if missing or info.get("mismatched_keys"):
        raise ConfigError(
            f"the checkpoint in {model_dir} does not fit {model_class.__name__}: missing {missing[:5]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:5]}"
        )
    weights = model_dir / "model.safetensors"
    if weights.is_file():  # belt and braces: one encoder tensor must equal the file's
        from safetensors import safe_open

        name = "bert.embeddings.word_embeddings.weight"
        with safe_open(weights, "pt") as f:
            if name in f.keys() and not torch.equal(f.get_tensor(name), model.state_dict()[name]):
                raise ConfigError(f"{name} in {model_dir} did not load into {model_class.__name__}")
    log.info("%s: encoder loaded from %s; fresh: %s", model_class.__name__, model_dir,
             sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]}))
    return model


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------- the loop
def _batches(data: dict[str, torch.Tensor], order: torch.Tensor, batch: int, device):
    """Batches of ``data`` rows in ``order``, trimmed to their longest sequence (right padding)."""
    for i in range(0, len(order), batch):
        rows = order[i : i + batch]
        length = int(data["attention_mask"][rows].sum(1).max())
        yield {k: (v[rows, :length] if v.dim() == 2 else v[rows]).to(device) for k, v in data.items()}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _fit(model, data, *, epochs, batch, lr, warmup_fraction, weight_decay, seed, device) -> int:
    """Fine-tune ``model`` on ``data`` (tensors incl. the labels); returns the number of steps."""
    n = len(data["input_ids"])
    spe = steps_per_epoch(n, batch)
    total = epochs_to_steps(epochs, spe)
    warmup = epochs_to_steps(warmup_fraction * epochs, spe) if warmup_fraction > 0 else 0
    lr_at = build_schedule("linear", peak_lr=lr, total_steps=total, warmup_steps=warmup, steps_per_epoch=spe)
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-6)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    step = 0
    while step < total:
        # Whole batches only (as steps_per_epoch counts them); a fresh shuffle every epoch.
        order = torch.randperm(n, generator=generator)[: spe * batch]
        for inputs in _batches(data, order, batch, device):
            if step == total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with _autocast(device):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return total


@contextlib.contextmanager
def _with_threads(threads: int | None):
    """torch's intra-op threads set for one fine-tune (timings comparable across runs), then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- classification
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
    recipe = {k: v for k, v in locals().items() if k not in ("model_dir", "threads", "device")}
    start = time.perf_counter()
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    train, evaluation, label_names = load_classification(task, seed=0)  # the split is fixed, not the seed
    train, evaluation = train[:max_train], evaluation[:max_eval]
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    dev = _device(device)

    def encode(examples):
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=seq_len, padding="max_length",
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in examples])}

    with _with_threads(threads):
        model = load_model(model_dir, BertForSequenceClassification, init, seed, num_labels=len(label_names))
        steps = _fit(model, encode(train), epochs=epochs, batch=batch, lr=lr, warmup_fraction=warmup_fraction,
                     weight_decay=weight_decay, seed=seed, device=dev)
        model.eval()
        data = encode(evaluation)
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for inputs in _batches(data, torch.arange(len(evaluation)), 2 * batch, dev):
                with _autocast(dev):
                    out = model(**inputs)
                correct += int((out.logits.argmax(-1) == inputs["labels"]).sum())
                loss_sum += float(out.loss) * len(inputs["labels"])
    return {"task": task, "init": init, "accuracy": correct / len(evaluation),
            "eval_loss": loss_sum / len(evaluation), "train_examples": len(train),
            "eval_examples": len(evaluation), "labels": label_names, "steps": steps,
            "seconds": round(time.perf_counter() - start, 2), "recipe": recipe}


# ---------------------------------------------------------------------------- SQuAD v1.1
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
            tokens = [t for t, c in enumerate(in_context) if c and window[t][0] < last and window[t][1] > first]
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
    return {e["id"]: (e["context"][best[j][1] : best[j][2]] if j in best else "") for j, e in enumerate(examples)}


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
    """Fine-tune on SQuAD v1.1 ``train_file``; F1 and exact match (0-100) on ``dev_file``, plus predictions."""
    recipe = {k: v for k, v in locals().items() if k not in ("model_dir", "threads", "device")}
    recipe.update(train_file=str(train_file), dev_file=str(dev_file))
    start = time.perf_counter()
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    train, dev_examples = load_squad(train_file)[:max_train], load_squad(dev_file)[:max_eval]
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    dev = _device(device)
    with _with_threads(threads):
        model = load_model(model_dir, BertForQuestionAnswering, init, seed)
        train_data, _, _ = squad_features(tokenizer, train, max_seq_len, doc_stride, train=True)
        steps = _fit(model, train_data, epochs=epochs, batch=batch, lr=lr, warmup_fraction=warmup_fraction,
                     weight_decay=weight_decay, seed=seed, device=dev)
        data, example_of, offsets = squad_features(tokenizer, dev_examples, max_seq_len, doc_stride, train=False)
        model.eval()
        starts, ends = [], []
        with torch.no_grad():
            for inputs in _batches(data, torch.arange(len(example_of)), 2 * batch, dev):
                with _autocast(dev):
                    out = model(**inputs)
                starts.extend(out.start_logits.float().cpu())
                ends.extend(out.end_logits.float().cpu())
    predictions = squad_predictions(dev_examples, example_of, offsets, starts, ends, max_answer_len, n_best)
    return {"task": "squad_v1.1", "init": init, **squad_metrics(predictions, dev_examples),
            "train_examples": len(train), "train_windows": len(train_data["input_ids"]),
            "eval_examples": len(dev_examples), "eval_windows": len(example_of), "steps": steps,
            "seconds": round(time.perf_counter() - start, 2), "recipe": recipe, "predictions": predictions}


# ---------------------------------------------------------------------------- CLI
def _finetune_run(run_dir: Path, args, init: str) -> dict:
    # Only what the user set: the functions' defaults are the recipe for their task.
    common = {"init": init, "seed": args.seed, "threads": args.threads}
    common.update({k: v for k in ("epochs", "lr", "batch", "max_train", "max_eval")
                   if (v := getattr(args, k)) is not None})
    if args.squad_train:
        return finetune_squad(run_dir / "model", args.squad_train, args.squad_dev, **common)
    return finetune_classification(run_dir / "model", task=args.task, **common)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lb-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="pretraining run folder(s)")
    parser.add_argument("--task", default="tweets", help="bundled classification task (tweets, wiki_topics)")
    parser.add_argument("--random-init", action="store_true",
                        help="also fine-tune the same config from random weights (-> downstream_random.json)")
    parser.add_argument("--squad-train", type=Path, help="SQuAD v1.1 train JSON: fine-tune on SQuAD instead")
    parser.add_argument("--squad-dev", type=Path, help="SQuAD v1.1 dev JSON (with --squad-train)")
    parser.add_argument("--out", default="downstream.json", help="file name written inside each RUN_DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, help="default: 1 (classification), 3 (SQuAD)")
    parser.add_argument("--lr", type=float, help="default: 1e-4 (classification), 5e-5 (SQuAD)")
    parser.add_argument("--batch", type=int, help="default: 32")
    parser.add_argument("--max-train", type=int, help="first N training examples (classification: 8000)")
    parser.add_argument("--max-eval", type=int, help="first N eval examples (classification: 2000)")
    # 1 by default: on the shared 2-core box, 2 threads ran 4-9x slower (oversubscribed), same accuracy.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's)")
    args = parser.parse_args(argv)
    try:
        if bool(args.squad_train) != bool(args.squad_dev):
            raise ConfigError("--squad-train and --squad-dev go together; give both files")
        for path in (args.squad_train, args.squad_dev):
            if path is not None and not path.is_file():
                load_squad(path)  # raises the DataNotFoundError that says where SQuAD comes from
        for run_dir in args.run_dirs:
            _check_model_dir(run_dir / "model")
        from largebatch.tracking import environment

        for run_dir in args.run_dirs:
            out = Path(args.out)
            targets = [("pretrained", run_dir / out)]
            if args.random_init:
                targets.append(("random", run_dir / f"{out.stem}_random{out.suffix}"))
            for init, path in targets:
                result = _finetune_run(run_dir, args, init)
                if "predictions" in result:
                    path.with_name(f"{path.stem}_predictions.json").write_text(
                        json.dumps(result.pop("predictions"), indent=1))
                result.update(run_dir=str(run_dir), environment=environment())
                path.write_text(json.dumps(result, indent=2) + "\n")
                score = result.get("f1", math.nan) if args.squad_train else 100 * result["accuracy"]
                print(f"{run_dir} [{init}]: {'F1' if args.squad_train else 'accuracy'} {score:.2f} "
                      f"in {result['seconds']:.1f} s -> {path}")
    except LargebatchError as error:
        fail(error)


if __name__ == "__main__":
    main()
