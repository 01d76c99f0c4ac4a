"""Imports flow one way: cli -> train/plan/report -> tasks -> {models, data} and {optim, sched};
optim/ and sched/ need torch alone, so `largebatch.optim.create_optimizer` works in anyone's loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

TRAINER = {"largebatch.train", "largebatch.cli", "largebatch.plan"}
CASES = {
    "largebatch.optim": {"hydra", "omegaconf", "transformers", "largebatch.tasks", "largebatch.data", *TRAINER},
    "largebatch.data": {"largebatch.models", "largebatch.tasks", *TRAINER},
    "largebatch.models.lstm_lm": {"largebatch.data", "largebatch.tasks", *TRAINER},
    "largebatch.models.lstm_classifier": {"largebatch.data", "largebatch.tasks", *TRAINER},
    "largebatch.models.bert": {"largebatch.data", "largebatch.tasks", *TRAINER},
    "largebatch.models.resnet": {"largebatch.data", "largebatch.tasks", *TRAINER},
    "largebatch.models.seq2seq": {"largebatch.data", "largebatch.tasks", *TRAINER},
    "largebatch.data.parallel": {"largebatch.models", "largebatch.tasks", *TRAINER},
    "largebatch.tasks": {"largebatch.train", "largebatch.cli"},
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_module_imports_nothing_above_it(module):
    code = f"import sys, {module}; print(sorted(set(sys.modules)))"
    loaded = set(eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert not CASES[module] & loaded, f"{module} pulls in {sorted(CASES[module] & loaded)}"
