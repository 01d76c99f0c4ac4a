"""The perplexity floor a translation model must beat: a unigram model of the training targets, scored on the
same held-out target tokens the seq2seq task's evaluation scores (its eval/ppl; every target token and EOS).

    python scripts/unigram_ppl.py model=seq2seq data=verses scale=small data.max_train=4097 data.max_eval=200

Add-one smoothing over the vocabulary. A model whose valid perplexity is near this number has learned which
target tokens are frequent, not yet the source nor the context (the perplexity counterpart of the copy-
the-source BLEU baseline in the task's test evaluation).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.config import compose  # noqa: E402
from largebatch.data.parallel import EOS_ID  # noqa: E402
from largebatch.errors import LargebatchError, fail  # noqa: E402
from largebatch.tasks import build_task  # noqa: E402


def unigram_ppl(train_targets: list[list[int]], eval_targets: list[list[int]], vocab_size: int) -> tuple[float, int]:
    """(perplexity, tokens): add-one unigram of ``train_targets`` + EOS, scored on ``eval_targets`` + EOS."""
    counts = Counter(token for target in train_targets for token in [*target, EOS_ID])
    total = sum(counts.values()) + vocab_size
    tokens = [token for target in eval_targets for token in [*target, EOS_ID]]
    nll = -sum(math.log((counts[token] + 1) / total) for token in tokens)
    return math.exp(nll / len(tokens)), len(tokens)


def main(argv: list[str]) -> tuple[float, int]:
    cfg = compose(argv)
    if cfg.model.task != "translate":
        raise LargebatchError(f"model={cfg.model.name} is not a translation model: pass model=seq2seq")
    data = build_task(cfg).data  # its valid split already cut to data.max_eval, as the evaluation reads it
    limit = None if cfg.eval_max_batches is None else cfg.eval_max_batches * cfg.eval_batch  # as evaluate() does
    ppl, tokens = unigram_ppl(data.train.tgt, data.valid.dataset.tgt[:limit], data.tokenizer.get_vocab_size())
    print(f"unigram perplexity of the {len(data.train)} training targets on {tokens} valid tokens: {ppl:.1f}")
    return ppl, tokens


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except LargebatchError as error:
        fail(error)
