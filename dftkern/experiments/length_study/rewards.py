"""The two length rewards — the trainer's built-in length rewards (:mod:`dftkern.train.rewards`) —
and the modal length. Rewards are ``reward(prompt, response, reference) -> float`` callables,
handed to the trainer as they are (no module state, no import by name).

* ``min_length``: :func:`dftkern.train.rewards.neg_length_reward`, ``-len(response)``;
* ``mode_length``: :class:`dftkern.train.rewards.LengthPeakReward` peaked at the reference's
  modal length, ``exp(-((len(response) - mode) / width)^2)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dftkern.train.rewards import LengthPeakReward, RewardFn, neg_length_reward

__all__ = ["LENGTH_REWARDS", "response_length", "min_length_reward", "length_reward", "modal_length"]

LENGTH_REWARDS = ("min_length", "mode_length")

#: ``-len(response)``: shorter is better, the empty response is optimal (the trainer's ``neg_length``)
min_length_reward = neg_length_reward


def response_length(response: str) -> int:
    """Length of a response in characters (with the character tokenizer: tokens before EOS)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return len(response)


def length_reward(name: str, mode: int | None = None, width: float = 1.0) -> RewardFn:
    """The reward called ``name``: ``"min_length"``, or ``"mode_length"`` peaked at ``mode``
    characters (an integer >= 0, required) with ``width`` (> 0)."""
    if name == "min_length":
        return min_length_reward
    if name != "mode_length":
        raise ValueError(f"name must be one of {LENGTH_REWARDS}, got {name!r}")
    if isinstance(mode, bool) or not isinstance(mode, int) or mode < 0:
        raise ValueError(f"mode_length needs mode, the peak length: an integer >= 0, got {mode!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return LengthPeakReward(mode, width)


def modal_length(lengths: Sequence[int]) -> int:
    """The most frequent length (the smallest one on ties)."""
    if len(lengths) == 0:
        raise ValueError("lengths is empty")
    counts = Counter(int(v) for v in lengths)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)
