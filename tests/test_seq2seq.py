"""Seq2seq translation: verse pairs and their split, the BPE round trip, the loader formats, the exact
loss under any micro-batch split, decoding, BLEU, a tiny model that learns, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import unicodedata

import pytest
import sacrebleu
import torch

from conftest import lb, train_on_one_and_two_processes
from largebatch.data import parallel
from largebatch.data.parallel import (
    PairDataset,
    collate_pairs,
    decode,
    encode,
    hub_splits,
    pad_pairs,
    text_file_splits,
    train_bpe,
    verse_splits,
)
from largebatch.errors import ConfigError, DataNotFoundError
from largebatch.labels import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from largebatch.models.seq2seq import GNMT, Seq2seqShape

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def verses():
    return verse_splits("en", "es", seed=1234, valid_fraction=0.03, test_fraction=0.03)


def test_verse_pairs_are_aligned_and_split_by_whole_chapters(verses):
    sizes = {name: len(getattr(verses, name)) for name in ("train", "valid", "test")}
    assert sum(sizes.values()) == 31_084  # KJV and RV1909 slots both non-empty
    assert 0.02 < sizes["valid"] / 31_084 < 0.05 and 0.02 < sizes["test"] / 31_084 < 0.05
    chapters = {name: {key[:2] for key in keys} for name, keys in verses.keys.items()}
    assert not chapters["train"] & chapters["valid"] and not chapters["train"] & chapters["test"]
    assert not chapters["valid"] & chapters["test"]
    train = dict(zip(verses.keys["train"], verses.train))
    if ("Gen", 1, 1) in train:
        assert train[("Gen", 1, 1)] == ("In the beginning God created the heaven and the earth.",
                                        "EN el principio crió Dios los cielos y la tierra.")
    john = dict(zip(sum(verses.keys.values(), []), verses.train + verses.valid + verses.test))[("John", 11, 35)]
    assert john == ("Jesus wept.", "Y lloró Jesús.")
    again = verse_splits("en", "es", seed=1234, valid_fraction=0.03, test_fraction=0.03)
    other = verse_splits("en", "es", seed=7, valid_fraction=0.03, test_fraction=0.03)
    assert again.keys == verses.keys and other.keys["test"] != verses.keys["test"]
    reverse = verse_splits("es", "en", seed=1234, valid_fraction=0.03, test_fraction=0.03)
    assert reverse.test[0] == verses.test[0][::-1]


def test_bpe_round_trips_spanish_accents_and_punctuation(verses):
    tokenizer = train_bpe([t for pair in verses.train[:3000] for t in pair], vocab_size=2000)
    texts = ["¿Quién dió á Jacob en presa, é entregó á Israel á saqueadores?",
             "Y respondió Jesús: Niño, ¡levántate! Éxodo, año, pingüino.",
             "And God said, Let there be light: and there was light."]
    ids = encode(tokenizer, texts)
    assert decode(tokenizer, ids) == [unicodedata.normalize("NFC", t) for t in texts]
    assert all(PAD_ID not in row and EOS_ID not in row for row in ids)
    decomposed = unicodedata.normalize("NFD", "canción")  # NFD input decodes as NFC, like the references
    assert decode(tokenizer, encode(tokenizer, [decomposed])) == ["canción"]


def test_text_files_and_hub_format_loaders(tmp_path):
    for prefix, pairs in {"train": [("a b", "x y"), ("c", "z")], "dev": [("d", "w")], "test": [("e", "v")]}.items():
        (tmp_path / f"{prefix}.en").write_text("".join(s + "\n" for s, _ in pairs))
        (tmp_path / f"{prefix}.de").write_text("".join(t + "\n" for _, t in pairs))
    splits = text_file_splits(tmp_path, "en", "de", {"train": "train", "valid": "dev", "test": "test"})
    assert splits.train == [("a b", "x y"), ("c", "z")] and splits.valid == [("d", "w")]
    (tmp_path / "test.de").write_text("v\nextra\n")
    with pytest.raises(ConfigError, match="line-aligned"):
        text_file_splits(tmp_path, "en", "de", {"train": "train", "valid": "dev", "test": "test"})
    with pytest.raises(DataNotFoundError, match="missing.en"):
        text_file_splits(tmp_path, "en", "de", {"train": "missing", "valid": "dev", "test": "test"})

    files = {}
    for name, pairs in {"train": [("Hello", "Hallo"), ("World", "Welt")], "validation": [("Yes", "Ja")],
                        "test": [("No", "Nein")]}.items():
        files[name] = str(tmp_path / f"{name}.jsonl")
        with open(files[name], "w") as f:  # WMT16's record format on the hub
            for en, de in pairs:
                f.write(json.dumps({"translation": {"de": de, "en": en}}) + "\n")
    splits = hub_splits("json", None, "en", "de", {"train": "train", "valid": "validation", "test": "test"}, files)
    assert splits.train == [("Hello", "Hallo"), ("World", "Welt")] and splits.test == [("No", "Nein")]
    with pytest.raises(ConfigError, match="translates de / en"):
        hub_splits("json", None, "en", "fr", {"train": "train", "valid": "validation", "test": "test"}, files)


def test_non_utf8_parallel_file_is_one_clear_error_naming_it(tmp_path):
    prefixes = {"train": "train", "valid": "dev", "test": "test"}
    for prefix in prefixes.values():
        (tmp_path / f"{prefix}.en").write_text("a house\nthe end\n")
        (tmp_path / f"{prefix}.de").write_text("ein Haus\ndas Ende\n")
    bad = tmp_path / "dev.de"
    bad.write_bytes(b"ein Haus\n" + "das Ende, Gr\u00fc\u00dfe\n".encode("latin-1"))  # latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 21, line 2: a binary file, or another "
                                          r"encoding\?\): convert it to UTF-8 \(e\.g\. `iconv -f latin1") as error:
        text_file_splits(tmp_path, "en", "de", prefixes)
    assert str(error.value).startswith(str(bad)) and "\n" not in str(error.value)


def test_a_damaged_cached_bpe_tokenizer_is_trained_again_with_a_warning(tmp_path, caplog):
    pairs = [(f"the house number {i} is red", f"das Haus Nummer {i} ist rot") for i in range(40)]
    splits = parallel.ParallelSplits(train=pairs, valid=[], test=[], description="toy", input_files=[])
    folder = tmp_path / "parallel-cache"
    first = parallel.load_or_train_bpe(splits, 60, folder)
    path = folder / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:200])  # truncated: a full disk, a killed copy
    with caplog.at_level("WARNING", logger="largebatch.data.parallel"):
        again = parallel.load_or_train_bpe(splits, 60, folder)
    assert f"the cached tokenizer {path} does not load" in caplog.text and "training it again" in caplog.text
    assert decode(again, encode(again, ["das Haus ist rot"])) == ["das Haus ist rot"]
    assert again.get_vocab_size() == first.get_vocab_size()
    caplog.clear()  # the file was written again: the next call loads it, silently
    assert parallel.load_or_train_bpe(splits, 60, folder).get_vocab() == again.get_vocab() and not caplog.text


def test_missing_sword_module_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setattr("largebatch.data.sword.SWORD_ROOTS", (tmp_path,))
    with pytest.raises(DataNotFoundError, match="apt-get install sword-text-kjv"):
        verse_splits("en", "es", seed=1, valid_fraction=0.03, test_fraction=0.03)


def test_unknown_language_pair_is_refused():
    with pytest.raises(ConfigError, match="no 'fr' text.*en .*es "):
        verse_splits("en", "fr", seed=1, valid_fraction=0.03, test_fraction=0.03)


def test_padding_and_bucketing_keep_the_step():
    samples = [{"src": torch.tensor([5] * n), "tgt": torch.tensor([6] * (7 - n))} for n in (3, 1, 5, 2)]
    batch = pad_pairs(samples[:2])
    assert batch["src"].tolist() == [[5, 5, 5], [5, PAD_ID, PAD_ID]] and batch["src_lengths"].tolist() == [3, 1]
    assert batch["tgt_in"][0].tolist() == [BOS_ID, 6, 6, 6, 6, PAD_ID, PAD_ID]
    assert batch["tgt_out"][0].tolist() == [6, 6, 6, 6, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]
    bucketed = collate_pairs(samples, micro_batch=2, bucket=True)
    assert [mb["src_lengths"].tolist() for mb in bucketed] == [[1, 2], [3, 5]]
    assert [mb["src_lengths"].tolist() for mb in collate_pairs(samples, 2)] == [[3, 1], [5, 2]]


# ---------------------------------------------------------------------- model and loss
def _toy_model(**kw) -> GNMT:
    shape = dict(vocab_size=20, hidden=16, embed=16, encoder_layers=3, decoder_layers=3, dropout=0.0)
    torch.manual_seed(0)
    return GNMT(Seq2seqShape(**{**shape, **kw}))


def _toy_pairs(n: int, seed: int = 0) -> PairDataset:
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(4, 12, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return PairDataset(src, [list(s) for s in src])


@pytest.mark.parametrize("normalise_by", ["sentences", "tokens"])
@pytest.mark.parametrize("attention", ["normed_bahdanau", "luong"])
def test_loss_is_exact_under_any_micro_batch_split_with_padding(compose_cfg, normalise_by, attention):
    from largebatch.tasks import build_task

    task = build_task(compose_cfg("model=seq2seq", "data=verses", f"model.normalise_by={normalise_by}"))
    model = _toy_model(attention=attention, label_smoothing=0.1)
    samples = [_toy_pairs(12)[i] for i in range(12)]

    def gradient(micro_batch, bucket):
        model.zero_grad()
        micro_batches = collate_pairs(samples, micro_batch, bucket)
        count = sum(task.normaliser(mb) for mb in micro_batches)
        for mb in micro_batches:
            (model(**mb)["loss_sum"] / count).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = gradient(12, False)
    for micro_batch, bucket in ((4, False), (3, True), (5, False), (1, False)):
        assert torch.allclose(gradient(micro_batch, bucket), whole, atol=1e-6, rtol=1e-5)
    tokens = sum(len(s["tgt"]) + 1 for s in samples)
    assert task.normaliser(pad_pairs(samples)) == (12 if normalise_by == "sentences" else tokens)


def test_beam_of_one_is_greedy_and_wider_beams_are_well_formed():
    model = _toy_model().eval()
    batch = pad_pairs([_toy_pairs(9, seed=3)[i] for i in range(9)])
    greedy = model.greedy(batch["src"], batch["src_lengths"], max_len=12)
    assert model.beam_search(batch["src"], batch["src_lengths"], 1, 1.0, max_len=12) == greedy
    wide = model.beam_search(batch["src"], batch["src_lengths"], 4, 0.6, max_len=12)
    assert len(wide) == 9 and all(len(h) <= 12 and EOS_ID not in h and BOS_ID not in h for h in wide)
    with pytest.raises(ValueError, match="beam size"):
        model.beam_search(batch["src"], batch["src_lengths"], 0, 1.0, max_len=12)


def test_a_tiny_model_learns_to_copy_a_toy_language():
    """Copying 2-5 tokens of 8 symbols: untrained ~0% exact; it needs attention to learn where to look."""
    model = _toy_model(attention="luong", encoder_layers=2, decoder_layers=2, hidden=32, embed=32)
    data = _toy_pairs(512)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(800):
        batch = pad_pairs([data[(step * 32 + i) % 512] for i in range(32)])
        out = model(**batch)
        (out["loss_sum"] / 32).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    held_out = _toy_pairs(64, seed=99)
    batch = pad_pairs([held_out[i] for i in range(64)])
    for beam in (1, 3):
        out = (model.greedy(batch["src"], batch["src_lengths"], 16) if beam == 1 else
               model.beam_search(batch["src"], batch["src_lengths"], beam, 1.0, 16))
        exact = sum(hyp == ref for hyp, ref in zip(out, held_out.tgt)) / 64
        assert exact > 0.5, f"beam {beam}: only {exact:.0%} of held-out sequences copied exactly"


def test_bleu_of_a_perfect_hypothesis_is_100_and_the_copy_baseline_is_sacrebleus():
    from largebatch.tasks.seq2seq import _scores

    refs = ["Y lloró Jesús.", "En el principio crió Dios los cielos y la tierra."]
    assert _scores("x", refs, refs)["x/bleu"] == pytest.approx(100.0)
    sources = ["Jesus wept.", "In the beginning God created the heaven and the earth."]
    assert _scores("c", sources, refs)["c/bleu"] == pytest.approx(sacrebleu.corpus_bleu(sources, [refs]).score)


# ---------------------------------------------------------------------- the trainer
def test_lb_train_seq2seq_reports_bleu_and_writes_translations(compose_cfg, tmp_path):
    from largebatch.tasks.seq2seq import TranslationTask
    from largebatch.train import train

    cfg = compose_cfg("model=seq2seq", "data=verses", "epochs=0.5", "save_checkpoint=false")
    summary = train(cfg, tmp_path)
    assert summary["primary_metric"] == "eval/bleu" and summary["eval/sentences"] == 16
    test = TranslationTask(cfg).data.test
    sources, refs = [s for s, _ in test.pairs], [t for _, t in test.pairs]
    assert summary["test/copy_source/bleu"] == pytest.approx(sacrebleu.corpus_bleu(sources, [refs]).score)
    hyps = (tmp_path / "translations" / "test.hyp").read_text().splitlines()
    assert len(hyps) == 16 and summary["test/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert summary["test/decoder"] == "beam 2, length penalty 1.0"
    assert sources[0] in (tmp_path / "examples.md").read_text()



def test_final_eval_false_skips_the_test_decode_and_keeps_the_periodic_evaluations(compose_cfg, tmp_path):
    from largebatch.train import train

    cfg = compose_cfg("model=seq2seq", "data=verses", "epochs=0.5", "save_checkpoint=false", "final_eval=false")
    summary = train(cfg, tmp_path)
    assert summary["eval/sentences"] == 16 and "eval/ppl" in summary and "eval/bleu" in summary
    assert not [key for key in summary if key.startswith("test/")]
    assert not (tmp_path / "translations").exists() and not (tmp_path / "examples.md").exists()

@pytest.mark.system
def test_two_processes_match_one(tmp_path, data_cache):
    """Loss, greedy BLEU on valid and beam BLEU on test (decoded by two ranks, gathered) as one process."""
    base = ["model=seq2seq", "data=verses", "scale=tiny", "model.dropout=0", "micro_batch=4", "epochs=0.5",
            "progress=false", "save_checkpoint=false", f"data.cache_dir={data_cache}"]
    folders = train_on_one_and_two_processes(base, tmp_path)
    one, two = (json.loads((folder / "summary.json").read_text()) for folder in folders)
    assert two["world_size"] == 2
    for key in ("final_loss", "eval/loss", "test/loss", "eval/bleu", "test/bleu", "test/chrf"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    one_hyp, two_hyp = ((folder / "translations" / "test.hyp").read_text() for folder in folders)
    assert one_hyp == two_hyp


@pytest.mark.parametrize("override, message", [
    ("model.beam_size=0", "model.beam_size=0 must be >= 1"),
    ("data.tgt_lang=fr", "data=verses has no 'fr' text"),
    ("model.attention=dot", "model.attention='dot' is not one of"),
])
def test_bad_input_gives_one_clear_message(override, message, tmp_path):
    result = subprocess.run([lb("lb-plan"), "model=seq2seq", "data=verses", "scale=tiny", override],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_paper_scale_plan_needs_no_data():
    result = subprocess.run([lb("lb-plan"), "experiment=gnmt4"], capture_output=True, text=True, check=True)
    assert "4+4 LSTM x 1024" in result.stdout and "340000" in result.stdout


def test_reference_run_is_described_by_its_records():
    """results/seq2seq/ holds a run's records, not numbers typed by hand."""
    from conftest import REPO

    folder = REPO / "results" / "seq2seq"
    if not (folder / "summary.json").exists():
        pytest.skip("no committed reference run")
    summary = json.loads((folder / "summary.json").read_text())
    hyps = (folder / "translations" / "test.hyp").read_text().splitlines()
    refs = [unicodedata.normalize("NFC", t) for _, t in parallel.verse_splits(
        "en", "es", seed=1234, valid_fraction=0.03, test_fraction=0.03).test]
    assert len(hyps) == len(refs) == summary["test/sentences"]
    assert summary["test/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_the_unigram_floor_is_add_one_unigram_perplexity_of_the_training_targets(data_cache):
    """scripts/unigram_ppl.py: a hand-computed case, then the tiny verses, where it lies between a perfect
    model (1) and a uniform one (the vocabulary)."""
    from conftest import load_script

    script = load_script("scripts/unigram_ppl.py")
    assert script.EOS_ID not in (5, 6)
    ppl, tokens = script.unigram_ppl([[5, 5, 6]], [[5]], vocab_size=10)  # counts 5:2 6:1 EOS:1, + 10: /14
    assert tokens == 2 and ppl == pytest.approx(math.exp(-(math.log(3 / 14) + math.log(2 / 14)) / 2))
    ppl, tokens = script.main(["model=seq2seq", "data=verses", "scale=tiny", f"data.cache_dir={data_cache}"])
    assert tokens > 16 and 1.0 < ppl < 400
