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


def test_the_run_folder_format_has_one_home():
    """Every module names a run's records through largebatch/runfolder.py: a file name spelled out anywhere else
    in the package or the drivers is a second home of the format (change the format there, or nowhere)."""
    import re
    from pathlib import Path

    from largebatch import runfolder

    repo = Path(__file__).resolve().parents[1]
    names = [runfolder.CONFIG, runfolder.STATUS, runfolder.SUMMARY, runfolder.METRICS, runfolder.PLAN, runfolder.ENV,
             runfolder.DOWNSTREAM, runfolder.DOWNSTREAM_RANDOM]
    spelled = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in names))
    homes = [f"{path.relative_to(repo)}:{i}" for path in [*(repo / "largebatch").rglob("*.py"), *(repo / "scripts").rglob("*.py")]
             if path.name != "runfolder.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert not homes, f"run-folder names spelled outside largebatch/runfolder.py: {homes}"
