"""Setup for the Transformers/TRL integration tests: offline, no telemetry, one torch thread.

Every model here is a tiny random-init model built in-process (nothing is downloaded).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

# TRL pings a telemetry endpoint from Trainer.__init__ unless told not to; nothing may leave the machine.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _no_full_gc_after_training(monkeypatch):
    """accelerate's ``free_memory()``, run at the end of every ``Trainer.train()``, calls a full ``gc.collect()``:
    about 0.5 s per call in a pytest process that holds many objects, for tiny CPU models that need no memory
    back. Skipped here (numerics untouched); subprocess tests are unaffected."""
    try:
        import accelerate.utils.memory as memory
    except ImportError:  # without the trl extra nothing trains here
        yield
        return
    monkeypatch.setattr(memory, "gc", SimpleNamespace(collect=lambda *args, **kwargs: 0))
    yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster (and steadier on a shared 2-core machine) on one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
