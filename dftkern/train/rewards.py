"""Rewards, in one place: the :data:`RewardFn` type, the built-in rewards, and how a reward given
as a name is turned into a function.

Every reward has the signature ``reward(prompt: str, response: str, reference: str) -> float``
(``reference`` is the data's good answer); task metrics (``eval --metric``) are the same kind of
function. Every Python API that takes a reward or metric (``GenerateConfig.reward``,
``OnPolicyConfig.reward`` / ``TrainConfig(reward=...)``, ``EvalConfig.metric``) accepts
``RewardFn | str``: a callable is used as it is (a closure or an object with state is fine, it
need not be importable), a string is resolved by :func:`resolve_reward`. The built-in names, usable
as ``--reward NAME`` without writing a module:

======================  ===========================================================================
name                    reward
======================  ===========================================================================
``exact_match``         1.0 when the response equals the reference (surrounding whitespace ignored)
``addition``            1.0 when the response is the correct sum of an ``"a+b="`` prompt
                        (:func:`dftkern.train.synthetic.addition_reward`; the reference is ignored)
``neg_length``          ``-len(response)``: minus the response length in **characters** (the
                        decoded text; with the synthetic task's character tokenizer, one token per
                        character, EOS excluded)
``length_peak:MU``      ``exp(-((len(response) - MU) / WIDTH) ** 2)`` with ``WIDTH = 2``: 1.0 at
``length_peak:MU:WIDTH``  exactly ``MU`` characters, falling off on either side; ``MU >= 0`` and
                        ``WIDTH > 0`` are numbers
======================  ===========================================================================

Anything else must be ``package.module:function`` and is imported (the pre-existing convention).
Built-in names are matched first, so ``length_peak:3`` is never taken for a module called
``length_peak``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from .synthetic import addition_reward

__all__ = ["RewardFn", "BUILTIN_REWARDS", "exact_match", "exact_match_reward", "neg_length_reward",
           "LengthPeakReward", "load_callable", "resolve_reward", "reward_name"]

RewardFn = Callable[[str, str, str], float]
"""``reward(prompt, response, reference) -> float``."""


def load_callable(spec: str, *, what: str = "callable") -> Callable:
    """Import ``"package.module:function"`` and return the function."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{what} must look like 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({err})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no callable {attr!r}")
    return function


def exact_match(prompt: str, response: str, reference: str) -> float:
    """The default task metric: 1.0 when the response equals the reference (surrounding whitespace ignored)."""
    return 1.0 if response.strip() == reference.strip() else 0.0

BUILTIN_REWARDS = ("exact_match", "addition", "neg_length", "length_peak:MU[:WIDTH]")


def exact_match_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 when ``response`` equals ``reference`` after stripping surrounding whitespace, else 0.0."""
    if reference is None:
        raise ValueError("the exact_match reward needs the reference answer, got reference=None")
    return exact_match(prompt, response, reference)


def neg_length_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """``-len(response)`` in characters: shorter is better. ``prompt``/``reference`` are ignored."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return -float(len(response))


class LengthPeakReward:
    """``exp(-((len(response) - mu) / width) ** 2)`` in (0, 1], 1.0 when the response has ``mu`` characters.

    A picklable callable (not a closure) so that configs and checkpoints holding it stay plain data.
    """

    def __init__(self, mu: float, width: float = 2.0):
        for name, value in (("mu", mu), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"length_peak {name} must be a finite number, got {value!r}")
        if mu < 0:
            raise ValueError(f"length_peak MU must be >= 0 (a length in characters), got {mu}")
        if width <= 0:
            raise ValueError(f"length_peak WIDTH must be > 0, got {width}")
        self.mu, self.width = float(mu), float(width)

    def __call__(self, prompt: str, response: str, reference: str | None = None) -> float:
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        return math.exp(-((len(response) - self.mu) / self.width) ** 2)

    def __repr__(self) -> str:
        return f"LengthPeakReward(mu={self.mu:g}, width={self.width:g})"


_SIMPLE: dict[str, RewardFn] = {
    "exact_match": exact_match_reward,
    "addition": addition_reward,
    "neg_length": neg_length_reward,
}


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--reward {spec!r}: {what} must be a number, got {text!r} "
                         f"(expected length_peak:MU or length_peak:MU:WIDTH)") from None
    if not math.isfinite(value):
        raise ValueError(f"--reward {spec!r}: {what} must be finite, got {text!r}")
    return value


def resolve_reward(spec: RewardFn | str, *, what: str = "--reward") -> RewardFn:
    """The reward function named by ``spec``: a built-in name (see the module docstring) or ``module:function``;
    a callable is returned as it is.

    Raises:
        ValueError: an unknown or malformed name, bad ``length_peak`` parameters, or a module/function
            that cannot be imported.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} must be a built-in reward {BUILTIN_REWARDS} or 'package.module:function' (or a "
                         f"callable), got {spec!r}")
    spec = spec.strip()
    if spec in _SIMPLE:
        return _SIMPLE[spec]
    head, _, rest = spec.partition(":")
    if head == "length_peak":
        parts = rest.split(":") if rest else []
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"{what} {spec!r}: expected length_peak:MU or length_peak:MU:WIDTH "
                             f"(e.g. length_peak:3 or length_peak:3:1.5)")
        mu = _number(parts[0], "MU", spec)
        width = _number(parts[1], "WIDTH", spec) if len(parts) == 2 else 2.0
        try:
            return LengthPeakReward(mu, width)
        except ValueError as err:
            raise ValueError(f"{what} {spec!r}: {err}") from None
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r} is not a built-in reward {BUILTIN_REWARDS}; a custom reward must "
                         f"look like 'package.module:function'")
    return load_callable(spec, what=what)


def reward_name(reward: RewardFn | str | None) -> str | None:
    """A printable name: the string itself, or ``"module:qualname"`` of a function (an object's repr)."""
    if reward is None or isinstance(reward, str):
        return reward
    module, name = getattr(reward, "__module__", None), getattr(reward, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(reward)
