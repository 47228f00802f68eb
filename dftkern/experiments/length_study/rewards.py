"""The two length rewards, ``reward(prompt, response, reference) -> float``, and the modal length.

The trainer loads a reward by name (``package.module:function``), so the peak of
:func:`mode_length_reward` is module state (:func:`set_mode_length_target`, or the environment
variables ``DFTKERN_LENGTH_MODE``/``DFTKERN_LENGTH_WIDTH`` outside this process), and the number of
calls is counted here (:func:`reward_call_count`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["LENGTH_REWARDS", "response_length", "min_length_reward", "mode_length_reward", "set_mode_length_target",
           "reward_call_count", "modal_length"]

LENGTH_REWARDS = ("min_length", "mode_length")
_MODE_TARGET: dict[str, float] = {}  # {"mode": int, "width": float} once set
_REWARD_CALLS = Counter()


def response_length(response: str) -> int:
    """Length of a response in characters (with the character tokenizer: tokens before EOS)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return len(response)


def min_length_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """``-len(response)``: shorter is better, the empty response is optimal. ``prompt``/``reference`` are ignored."""
    _REWARD_CALLS["min_length"] += 1
    return -float(response_length(response))


def set_mode_length_target(mode: int | None, width: float = 1.0) -> None:
    """Set the peak (``mode``, in characters) and ``width`` of :func:`mode_length_reward`; ``None`` clears it.

    The trainer loads rewards by name (``MODULE:FUNCTION``), so the peak is module state. Outside this
    process set the environment variables ``DFTKERN_LENGTH_MODE`` (and optionally ``DFTKERN_LENGTH_WIDTH``).
    """
    if mode is None:
        _MODE_TARGET.clear()
        return
    if isinstance(mode, bool) or not isinstance(mode, int) or mode < 0:
        raise ValueError(f"mode must be an integer >= 0, got {mode!r}")
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    _MODE_TARGET.update(mode=mode, width=float(width))


def _mode_target() -> tuple[int, float]:
    if _MODE_TARGET:
        return int(_MODE_TARGET["mode"]), float(_MODE_TARGET["width"])
    if "DFTKERN_LENGTH_MODE" in os.environ:
        return int(os.environ["DFTKERN_LENGTH_MODE"]), float(os.environ.get("DFTKERN_LENGTH_WIDTH", "1.0"))
    raise ValueError("mode_length_reward has no target: call set_mode_length_target(mode) or set "
                     "DFTKERN_LENGTH_MODE")


def mode_length_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """``exp(-((len(response) - mode) / width)^2)`` in (0, 1], 1 at the target length (see :func:`set_mode_length_target`)."""
    mode, width = _mode_target()
    _REWARD_CALLS["mode_length"] += 1
    return math.exp(-((response_length(response) - mode) / width) ** 2)


_REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {"min_length": min_length_reward,
                                                      "mode_length": mode_length_reward}


def reward_call_count(name: str | None = None) -> int:
    """How many times the reward ``name`` (or any length reward) has been evaluated in this process."""
    if name is None:
        return sum(_REWARD_CALLS.values())
    if name not in LENGTH_REWARDS:
        raise ValueError(f"name must be one of {LENGTH_REWARDS} or None, got {name!r}")
    return _REWARD_CALLS[name]


def modal_length(lengths: Sequence[int]) -> int:
    """The most frequent length (the smallest one on ties)."""
    if len(lengths) == 0:
        raise ValueError("lengths is empty")
    counts = Counter(int(v) for v in lengths)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)

