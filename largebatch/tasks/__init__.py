"""Workload families. A model config names its task (``model.task``); adding a workload adds a task
module here, a model, a data reader and config files, and no change to the training loop.

    mlm       BERT masked-LM pretraining (LAMB)                        largebatch.tasks.mlm
    lm        stateful word-level LSTM language model (LEGW, PTB)      largebatch.tasks.lm
    classify  sequence classifier, e.g. an LSTM reading MNIST rows     largebatch.tasks.classify
    vision    image classifier: ResNet-50 (ImageNet) or ResNet-20      largebatch.tasks.vision
    translate GNMT-style seq2seq translation with BLEU (LEGW)          largebatch.tasks.seq2seq
"""

from __future__ import annotations

from importlib import import_module

from largebatch.errors import ConfigError
from largebatch.tasks.base import Metric, Task

TASKS = {
    "mlm": "largebatch.tasks.mlm:MaskedLMTask",
    "lm": "largebatch.tasks.lm:LanguageModelTask",
    "classify": "largebatch.tasks.classify:ClassificationTask",
    "vision": "largebatch.tasks.vision:VisionTask",
    "translate": "largebatch.tasks.seq2seq:TranslationTask",
}

__all__ = ["TASKS", "Metric", "Task", "build_task"]


def build_task(cfg) -> Task:
    """The task of ``cfg.model.task``, built from the whole config (nothing is loaded yet)."""
    name = cfg.model.task
    if name not in TASKS:
        raise ConfigError(f"model.task={name!r} is unknown; choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)(cfg)
