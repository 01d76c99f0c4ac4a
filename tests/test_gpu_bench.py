"""scripts/device/gpu_bench.py on tiny CPU shapes: every section runs and the report is complete, so the
one GPU run cannot fail for a silly reason (the numbers of a dry run mean nothing)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiling: ~60 s
def test_dry_run_writes_every_section(tmp_path, data_cache, compiled):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts/device/gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    args = ["--dry-run", "--out", str(out), "--cache-dir", str(data_cache), "--model-steps", "1"]
    status = bench.main(args + ([] if compiled else ["--skip-compile"]))
    text = out.read_text()
    assert "FAILED" not in text, text
    assert status == 0
    for heading in ("## Numerics", "## Optimizer step", "## Bare model", "## lb-train with the defaults"):
        assert heading in text
    assert "| lamb | fp32 |" in text and "| lars_mlperf | fp32 |" in text and "timm Lamb" in text
    assert ("| tiny | compiled |" in text) is compiled and "| tiny | eager |" in text
