"""Shared pytest setup for the dftkern test suite.

The Triton interpreter is switched on *before anything imports triton* (``TRITON_INTERPRET`` is
read when triton is first imported) so that every test can run ``backend="triton"`` on CPU tensors.
Exceptions: an explicit ``TRITON_INTERPRET`` in the environment is always respected, and on a
machine with a CUDA GPU the default is off, so that tests/gpu exercises the compiled kernels.
Tests that need the interpreter on CPU tensors skip themselves (``triton_cpu`` fixture) when it
is off.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def triton_interpreter_on() -> bool:
    """True when the Triton kernels can run on CPU tensors (interpreter mode) in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


@pytest.fixture
def triton_cpu():
    """Skip unless ``backend="triton"`` can run on CPU tensors (TRITON_INTERPRET=1 and triton importable)."""
    if not triton_interpreter_on():
        pytest.skip("needs TRITON_INTERPRET=1 and an importable triton to run the kernels on CPU")


@pytest.fixture
def no_dftkern_env(monkeypatch):
    """Remove ``DFTKERN_*`` environment overrides for the duration of a test."""
    for name in ("DFTKERN_BACKEND", "DFTKERN_CHUNK_BYTES", "DFTKERN_VALIDATE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Both engines; "triton" runs the kernels on CPU tensors (skipped without the interpreter)."""
    if request.param == "triton":
        request.getfixturevalue("triton_cpu")
    return request.param


@pytest.fixture
def forward_chunk_rows(monkeypatch):
    """Records the number of rows of every chunk the torch engine's forward epilogue sees."""
    from dftkern.engines import TorchRowEngine

    rows: list[int] = []
    original = TorchRowEngine.lse_and_logp

    def spy(self, logits, *args, **kwargs):
        rows.append(int(logits.shape[0]))
        return original(self, logits, *args, **kwargs)

    monkeypatch.setattr(TorchRowEngine, "lse_and_logp", spy)
    return rows
