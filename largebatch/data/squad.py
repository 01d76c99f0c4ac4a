"""SQuAD v1.1 (Rajpurkar et al. 2016, CC BY-SA 4.0): a reader for the JSON files and its metrics.

The data cannot come from a hub on these machines: download ``train-v1.1.json`` / ``dev-v1.1.json``
elsewhere and point the loader at them. The metrics follow the official v1.1 evaluation script's
definitions: answers are normalised (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed), F1 is over bags of tokens, each question takes its best ground truth, and
the corpus scores are percentages over all questions (unanswered ones score 0).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from largebatch.errors import DataNotFoundError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    # The official order matters: punctuation goes before articles, so "the-cat" -> "thecat" keeps "the".
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(ground_truths: str | list[str]) -> list[str]:
    return [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)


def _f1(prediction: str, truth: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: str | list[str]) -> float:
    """Token-bag F1 in [0, 1] against the best-matching ground truth."""
    return max((_f1(prediction, truth) for truth in _as_list(ground_truths)), default=0.0)


def squad_exact_match(prediction: str, ground_truths: str | list[str]) -> float:
    """1.0 when the normalised prediction equals some normalised ground truth, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(truth) for truth in _as_list(ground_truths)))


def squad_metrics(predictions: dict[str, str], examples: list[dict]) -> dict[str, float]:
    """{"f1", "exact_match"} as percentages (0-100) over every question in ``examples``."""
    if not examples:
        raise ValueError("squad_metrics needs at least one example")
    f1 = exact = 0.0
    for example in examples:
        prediction = predictions.get(example["id"])
        if prediction is None:
            continue  # unanswered: scores 0 but still counts, as in the official script
        f1 += squad_f1(prediction, example["answers"])
        exact += squad_exact_match(prediction, example["answers"])
    return {"f1": 100.0 * f1 / len(examples), "exact_match": 100.0 * exact / len(examples)}


def load_squad(path: str | Path) -> list[dict]:
    """Questions of a SQuAD v1.1 JSON file, in file order.

    Each: {"id", "title", "context", "question", "answers": [text, ...], "answer_starts": [int, ...]}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"SQuAD file not found: {path}. SQuAD v1.1 is not bundled (no hub here): download "
            f"train-v1.1.json / dev-v1.1.json on a machine with network access and copy them to this path"
        )
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    examples = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                examples.append(
                    {
                        "id": qa["id"],
                        "title": article.get("title", ""),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": [a["text"] for a in qa["answers"]],
                        "answer_starts": [a["answer_start"] for a in qa["answers"]],
                    }
                )
    return examples
