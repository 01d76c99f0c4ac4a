"""Downstream fine-tuning: init loading, a deterministic classification fine-tune, the SQuAD pipeline and its
span post-processing, CLI errors and the console script. A tiny BERT + WordPiece built here stands in for
a pretraining run."""

from __future__ import annotations

import json
import re
from importlib import import_module
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification

from largebatch.data.classification import load_classification
from largebatch.data.tokenizer import train_wordpiece
from largebatch.downstream import (
    best_span,
    finetune_classification,
    finetune_squad,
    load_model,
    main,
    squad_features,
    squad_predictions,
)
from largebatch.errors import ConfigError
from largebatch.models.bert import bert_config

CONTEXTS = [
    "The Amazon river flows through Brazil, Peru and Colombia. It is the largest river in the world by "
    "discharge volume of water, and it carries more water than the next seven rivers combined. Its basin "
    "covers about seven million square kilometres.",
    "Ada Lovelace was an English mathematician who worked on Charles Babbage's proposed mechanical computer, "
    "the Analytical Engine. She was born in London in 1815 and is often regarded as the first programmer.",
]
QUESTIONS = [  # (context, question, answer)
    (0, "Which countries does the Amazon flow through?", "Brazil, Peru and Colombia"),
    (0, "How large is the Amazon basin?", "about seven million square kilometres"),
    (1, "Who proposed the Analytical Engine?", "Charles Babbage"),
    (1, "When was Ada Lovelace born?", "1815"),
    (1, "Where was Ada Lovelace born?", "London"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 'pretraining run' model/ folder: BertForMaskedLM (seeded, so distinct from any test init) +
    WordPiece."""
    path = tmp_path_factory.mktemp("run") / "model"
    train, _, _ = load_classification("tweets")
    tokenizer = train_wordpiece([t for t, _ in train[:400]] + CONTEXTS * 5, vocab_size=600)
    torch.manual_seed(1234)
    config = bert_config("tiny", len(tokenizer), dropout=0.1, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def squad_file(tmp_path):
    data = {"data": [{"title": f"t{c}", "paragraphs": [{"context": CONTEXTS[c], "qas": [
        {"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": CONTEXTS[c].index(a)}]}
        for i, (cc, q, a) in enumerate(QUESTIONS) if cc == c]}]} for c in range(len(CONTEXTS))]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def _encoder(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("bert.") and ".pooler." not in k}


@pytest.mark.parametrize("model_class", [BertForSequenceClassification, BertForQuestionAnswering])
def test_pretrained_init_loads_the_encoder_and_random_init_does_not(model_dir, model_class):
    saved = _encoder(BertForMaskedLM.from_pretrained(model_dir))
    pretrained = _encoder(load_model(model_dir, model_class, "pretrained", seed=0))
    random = _encoder(load_model(model_dir, model_class, "random", seed=0))
    assert pretrained.keys() == saved.keys() == random.keys() and len(saved) > 20
    assert all(torch.equal(pretrained[k], saved[k]) for k in saved)
    assert not any(torch.equal(random[k], saved[k]) for k in saved if k.endswith("query.weight"))
    again = _encoder(load_model(model_dir, model_class, "random", seed=0))
    assert all(torch.equal(random[k], again[k]) for k in random)  # seeded


def test_a_checkpoint_under_another_prefix_is_refused(model_dir, tmp_path):
    """from_pretrained would silently fall back to random weights; load_model must not."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    save_file({k.replace("bert.", "encoder_model."): v.contiguous() for k, v in tensors.items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="does not fit"):
        load_model(tmp_path, BertForSequenceClassification, "pretrained", seed=0)


def test_classification_finetune_is_deterministic_and_init_matters(model_dir):
    kwargs = dict(task="tweets", max_train=128, max_eval=64, batch=32, seq_len=32, threads=1)
    first = finetune_classification(model_dir, seed=3, **kwargs)
    second = finetune_classification(model_dir, seed=3, **kwargs)
    random = finetune_classification(model_dir, seed=3, init="random", **kwargs)
    assert 0.0 <= first["accuracy"] <= 1.0 and first["steps"] == 4
    assert (first["train_examples"], first["eval_examples"]) == (128, 64)
    assert first["labels"] == ["negative", "positive"]
    assert (first["accuracy"], first["eval_loss"]) == (second["accuracy"], second["eval_loss"])
    assert random["init"] == "random" and random["eval_loss"] != first["eval_loss"]


def test_squad_training_windows_point_at_the_answer(model_dir):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    examples = [{"id": f"q{i}", "context": CONTEXTS[c], "question": q, "answers": [a],
                 "answer_starts": [CONTEXTS[c].index(a)]} for i, (c, q, a) in enumerate(QUESTIONS)]
    data, example_of, offsets = squad_features(tokenizer, examples, max_seq_len=40, doc_stride=12, train=True)
    assert len(example_of) > len(examples)  # the short windows overflow
    found = set()
    for i, j in enumerate(example_of):
        s, e = int(data["start_positions"][i]), int(data["end_positions"][i])
        if s == 0:
            assert e == 0  # answer not wholly in this window: [CLS]
            continue
        found.add(j)
        assert examples[j]["context"][offsets[i][s][0] : offsets[i][e][1]] == examples[j]["answers"][0]
    assert found == set(range(len(examples)))


def test_best_span_picks_the_best_valid_span_and_maps_it_back_to_text():
    context = "Ada was born in London in 1815"
    # tokens: [CLS] q q [SEP] Ada was born in London in 1815 [SEP]
    offsets = [None, None, None, None, (0, 3), (4, 7), (8, 12), (13, 15), (16, 22), (23, 25), (26, 30), None]
    start, end = torch.zeros(12), torch.zeros(12)
    start[1] = end[1] = 50.0  # the highest logits sit on a question token: never valid
    start[10] = end[6] = 8.0  # the best remaining pair ends before it starts: invalid
    start[8] = end[8] = 5.0  # "London", 10: beats "1815".."born"-free pairs such as start 10 + end 10 = 8
    score, first, last = best_span(start, end, offsets, max_answer_len=30)
    assert context[first:last] == "London" and score == pytest.approx(10.0)
    # A span longer than max_answer_len is refused: from "Ada" (4) to "1815" (10) is 7 tokens.
    start2, end2 = torch.zeros(12), torch.zeros(12)
    start2[4], end2[10] = 10.0, 10.0
    whole = best_span(start2, end2, offsets, max_answer_len=30)
    assert context[whole[1] : whole[2]] == "Ada was born in London in 1815"
    assert best_span(start2, end2, offsets, max_answer_len=6)[1:] != (0, 30)
    assert best_span(start2, end2, [None] * 12) is None
    # Across windows the higher-scoring window wins; a question with no valid span gets "".
    examples = [{"id": "a", "context": context}, {"id": "b", "context": context}]
    predictions = squad_predictions(examples, [0, 0, 1], [offsets, offsets, [None] * 12],
                                    [start, start2, start], [end, end2, end])
    assert predictions == {"a": "Ada was born in London in 1815", "b": ""}


def test_squad_pipeline_predicts_every_question(model_dir, squad_file):
    result = finetune_squad(model_dir, squad_file, squad_file, epochs=1, batch=4, lr=1e-4, max_seq_len=48,
                            doc_stride=16, threads=1)
    assert set(result["predictions"]) == {f"q{i}" for i in range(len(QUESTIONS))}
    assert 0.0 <= result["f1"] <= 100.0 and 0.0 <= result["exact_match"] <= result["f1"]
    assert result["eval_windows"] > result["eval_examples"] == len(QUESTIONS) and result["steps"] >= 1


def test_cli_writes_pretrained_and_random_results(model_dir, capsys):
    run_dir = model_dir.parent
    main([str(run_dir), "--random-init", "--max-train", "64", "--max-eval", "32", "--threads", "1"])
    pretrained = json.loads((run_dir / "downstream.json").read_text())
    random = json.loads((run_dir / "downstream_random.json").read_text())
    assert (pretrained["init"], random["init"]) == ("pretrained", "random")
    assert pretrained["recipe"]["lr"] == 1e-4 and pretrained["train_examples"] == 64
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_model", "no_weights", "no_squad"])
def test_cli_errors_are_one_line_and_exit_2(model_dir, tmp_path, capsys, case):
    if case == "no_model":
        argv = [str(tmp_path / "missing_run")]
    elif case == "no_weights":  # a run killed while saving: config.json but no weights
        (tmp_path / "torn" / "model").mkdir(parents=True)
        (tmp_path / "torn" / "model" / "config.json").write_text((model_dir / "config.json").read_text())
        argv = [str(tmp_path / "torn")]
    else:
        argv = [str(model_dir.parent), "--squad-train", str(tmp_path / "train-v1.1.json"),
                "--squad-dev", str(tmp_path / "dev-v1.1.json")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"no_model": "no model in", "no_weights": "no weights in", "no_squad": "SQuAD file not found"}[case] in err


def test_the_lb_finetune_console_script_still_reaches_main():
    """pyproject names ``largebatch.downstream:main``; the package's __init__ must keep re-exporting it."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, name = re.search(r'^lb-finetune = "([\w.]+):(\w+)"$', pyproject, re.M).groups()
    assert getattr(import_module(module), name) is main
