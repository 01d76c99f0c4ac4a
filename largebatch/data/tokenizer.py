"""A WordPiece tokenizer trained locally with `tokenizers` (BERT's normaliser and pre-tokeniser),
cached on disk and loaded as a ``BertTokenizerFast``.

transformers 5.x silently ignores ``BertTokenizerFast(vocab_file=...)`` (5-token vocabulary, every
word [UNK]); we go through ``tokenizer_object=`` and ``from_pretrained(dir)`` instead, and the tests
check that real words survive a round trip.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(documents: list[str], vocab_size: int) -> BertTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2)
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)


def load_or_train_tokenizer(documents: list[str], vocab_size: int, cache_dir: Path) -> BertTokenizerFast:
    """Train on ``documents`` once; later calls with the same cache_dir load the saved tokenizer."""
    if (cache_dir / "tokenizer.json").exists():
        return BertTokenizerFast.from_pretrained(cache_dir)
    tokenizer = train_wordpiece(documents, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(cache_dir)
    return tokenizer
