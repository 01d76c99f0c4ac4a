"""Downstream evaluation of a pretrained checkpoint: one fixed fine-tuning recipe per task, reported beside
the same recipe from a random initialisation (what pretraining bought).

    from largebatch.downstream import finetune_classification
    result = finetune_classification("outputs/run/model", task="tweets", init="pretrained", seed=0)

Modules, one job each:

- :mod:`.checkpoint`: load a pretraining run's encoder (or a seeded random init), refusing one that
  did not load;
- :mod:`.finetune`: the shared recipe and training loop, and the evaluation pass after it;
- :mod:`.classify`: sentence classification on a bundled task;
- :mod:`.squad`: SQuAD v1.1 windowing, answer-span decoding and its fine-tune;
- :mod:`.cli`: the ``lb-finetune`` command (``main``, the console script's target).
"""

from largebatch.downstream.classify import finetune_classification
from largebatch.downstream.cli import main
from largebatch.downstream.pretrained import INITS, load_model
from largebatch.downstream.squad import best_span, finetune_squad, squad_features, squad_predictions

__all__ = ["INITS", "best_span", "finetune_classification", "finetune_squad", "load_model", "main",
           "squad_features", "squad_predictions"]
