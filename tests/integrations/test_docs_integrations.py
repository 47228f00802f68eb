"""docs/integrations.md: every Python snippet runs as written (CPU, tiny in-process models)."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_doc_has_the_snippets():
    assert len(SNIPPETS) == 4
    assert "patch_causal_lm(model)" in SNIPPETS[0] and "DFTTrainer" in SNIPPETS[1] and "FusedDPOTrainer" in SNIPPETS[2]
    assert "FusedGRPOTrainer" in SNIPPETS[3] and "FusedRLOOTrainer" in SNIPPETS[3]


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_doc_snippet_runs(index, tmp_path, monkeypatch):
    if "trl" in SNIPPETS[index]:
        pytest.importorskip("trl", reason="TRL is not installed (pip install 'dftkern[trl]'); CI installs it")
    code = SNIPPETS[index].replace('"/tmp/', f'"{tmp_path}/')
    exec(compile(code, f"docs/integrations.md snippet {index}", "exec"), {"__name__": "doc_snippet"})
