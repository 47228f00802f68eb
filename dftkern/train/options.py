"""Options declared once: a config dataclass field carries its default, help text, accepted values and
command-line flag; validation and the command line are both generated from it.

    lr: float = option(1e-5, Number(low=0, low_open=True), "peak learning rate")

* :func:`validate` checks (and normalizes) every option of a config instance in ``__post_init__``:
  booleans must be ``bool``, integers ``int`` (not ``bool``), numbers finite and inside their
  range, choices one of theirs; the error names the field and says the accepted values, e.g.
  ``lr must be > 0 (a finite number), got inf``.
* :func:`add_arguments` adds one argparse option per field (``--lr``; ``--no-X`` for a boolean
  whose default is True), whose parser applies the same :class:`Spec`, with the help text and the
  ``(default: ...)`` taken from the field; :func:`option_names` lists the names the parsed
  namespace holds, so the stage config is built without reading argparse internals.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import MISSING, dataclass
from typing import Any

__all__ = ["Spec", "Integer", "Number", "Choice", "Flag", "Text", "Device", "AnyOf", "Function", "Option", "option",
           "options_of", "validate", "add_arguments", "option_names"]


# ---------------------------------------------------------------------------------------------
# accepted values
# ---------------------------------------------------------------------------------------------


class Spec:
    """The values one option accepts. ``optional``: None is accepted too (meaning "unset")."""

    optional: bool = False

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def accept(self, value: Any) -> tuple[bool, Any]:
        """``(ok, normalized value)`` for a Python value."""
        raise NotImplementedError  # pragma: no cover - overridden

    def from_text(self, text: str) -> Any:
        """The command-line text as a Python value (then checked by :meth:`accept`)."""
        return text

    def check(self, label: str, value: Any, why: str | None = None) -> Any:
        """The normalized value, or ``ValueError("<label> must be <describe>, got <value>")``."""
        if value is None and self.optional:
            return None
        ok, normalized = self.accept(value)
        if not ok:
            unset = " (or None)" if self.optional else ""
            raise ValueError(f"{label} must be {self.describe()}{unset}, got {value!r}" + (f": {why}" if why else ""))
        return normalized

    def parse(self, text: str) -> Any:
        """argparse ``type=``: the parsed value, or ``ArgumentTypeError`` saying what is accepted."""
        try:
            value = self.from_text(text)
        except ValueError:
            value = None
        ok, normalized = self.accept(value) if value is not None else (False, None)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return normalized


def _bounds(low, high, low_open: bool, high_open: bool, kind: str) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'} ({kind})"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g} ({kind})"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g} ({kind})"
    return kind


def _inside(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


@dataclass(frozen=True)
class Integer(Spec):
    """An ``int`` (not a ``bool``) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None
    optional: bool = False

    def describe(self) -> str:
        return _bounds(self.low, self.high, False, False, "an integer")

    def accept(self, value):
        ok = isinstance(value, int) and not isinstance(value, bool) and _inside(value, self.low, self.high, False,
                                                                                False)
        return ok, value

    def from_text(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class Number(Spec):
    """A finite ``int`` or ``float`` (not a ``bool``) in the given range; normalized to ``float``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    text: str | None = None  # describes the range in other words

    def describe(self) -> str:
        return self.text or _bounds(self.low, self.high, self.low_open, self.high_open,
                                    "a number" if self.low is not None and self.high is not None
                                    else "a finite number")

    def accept(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        return _inside(value, self.low, self.high, self.low_open, self.high_open), float(value)

    def from_text(self, text: str) -> float:
        return float(text)


@dataclass(frozen=True)
class Choice(Spec):
    """One of ``values`` (strings)."""

    values: tuple = ()
    optional: bool = False

    def describe(self) -> str:
        return f"one of {self.values}"

    def accept(self, value):
        return isinstance(value, str) and value in self.values, value


@dataclass(frozen=True)
class Flag(Spec):
    """A ``bool`` (``True``/``False`` only: ``"no"`` or ``1`` are refused)."""

    def describe(self) -> str:
        return "True or False (a bool)"

    def accept(self, value):
        return isinstance(value, bool), value


@dataclass(frozen=True)
class Text(Spec):
    """A non-empty string (a path, a device name, ...)."""

    optional: bool = False

    def describe(self) -> str:
        return "a non-empty string"

    def accept(self, value):
        return isinstance(value, str) and bool(value.strip()), value


@dataclass(frozen=True)
class Device(Spec):
    """``"auto"`` or a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""

    def describe(self) -> str:
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"

    def accept(self, value):
        if not isinstance(value, str):
            return False, value
        if value == "auto":
            return True, value
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            return False, value
        return True, value


@dataclass(frozen=True)
class Function(Spec):
    """A callable, or a non-empty string naming one (resolved later, e.g. by :func:`~.rewards.resolve_reward`)."""

    optional: bool = False

    def describe(self) -> str:
        return "a callable or a name (a built-in or 'package.module:function')"

    def accept(self, value):
        return callable(value) or (isinstance(value, str) and bool(value.strip())), value


@dataclass(frozen=True)
class AnyOf(Spec):
    """The first of ``specs`` that accepts the value (``text`` describes the union)."""

    specs: tuple = ()
    text: str = ""
    optional: bool = False

    def describe(self) -> str:
        return self.text

    def accept(self, value):
        for spec in self.specs:
            ok, normalized = spec.accept(value)
            if ok:
                return True, normalized
        return False, value

    def parse(self, text: str):
        for spec in self.specs:
            try:
                return spec.parse(text)
            except argparse.ArgumentTypeError:
                continue
        raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")


# ---------------------------------------------------------------------------------------------
# declaring options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """Field metadata: how an option is checked and shown on the command line.

    ``flag``: the long option (default ``--`` + the flat name with dashes); for a boolean whose
    default is True, the ``--no-...`` flag that turns it off. ``aliases``: more option strings
    (``-k``). ``label``: the name in error messages (default: the field name). ``why``: appended
    to the error message. ``default_text``: shown as ``(default: ...)`` instead of the default
    (``""``: show nothing). ``cli``: False keeps the field off the command line. ``nargs``/``const``:
    passed to argparse (``--resume`` with an optional value).
    """

    spec: Spec
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    group: str | None = None
    label: str | None = None
    why: str | None = None
    default_text: str | None = None
    cli: bool = True
    nargs: str | None = None
    const: Any = None
    name: str | None = None  # the flat name when it differs from the field name (nested configs)


def option(default: Any = MISSING, spec: Spec | None = None, help: str = "", **meta) -> Any:
    """A dataclass field declared with its :class:`Spec` and help (``meta``: the other :class:`Option` fields)."""
    if spec is None:
        raise TypeError("option() needs a spec")
    metadata = {"option": Option(spec=spec, help=help, **meta)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options_of(cls_or_obj) -> Iterator[tuple[dataclasses.Field, Option]]:
    """``(field, Option)`` for each declared option of a config class (or instance), in field order."""
    for f in dataclasses.fields(cls_or_obj):
        meta = f.metadata.get("option")
        if meta is not None:
            yield f, meta


def validate(obj) -> None:
    """Check and normalize every declared option of ``obj`` (works on frozen dataclasses too)."""
    for f, meta in options_of(obj):
        value = meta.spec.check(meta.label or f.name, getattr(obj, f.name), meta.why)
        object.__setattr__(obj, f.name, value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _help(f: dataclasses.Field, meta: Option) -> str:
    default = _default(f)
    if meta.default_text is not None:
        shown = meta.default_text
    elif default is MISSING or default is None or isinstance(meta.spec, Flag):
        shown = ""
    else:
        shown = str(default)
    return f"{meta.help} (default: {shown})" if shown else meta.help


def add_arguments(parser: argparse.ArgumentParser, *classes: type, groups: dict[str, str] | None = None,
                  defaults: dict[str, Any] | None = None) -> None:
    """Add every command-line option of the config ``classes`` to ``parser``.

    Args:
        groups: argument-group titles by :attr:`Option.group` key (options without a group go to
            ``parser`` itself); one group per key, shared by all ``classes``.
        defaults: command-line defaults that differ from the field defaults (e.g. None meaning
            "not given", for options applied as overrides or only needed in one mode).
    """
    made: dict[str, Any] = {}
    for cls in classes:
        for f, meta in options_of(cls):
            if meta.cli:
                if meta.group is not None and meta.group not in made:
                    made[meta.group] = parser.add_argument_group((groups or {}).get(meta.group, meta.group))
                _add_argument(made.get(meta.group, parser), cls, f, meta, defaults or {})


def _add_argument(target, cls: type, f: dataclasses.Field, meta: Option, defaults: dict[str, Any]) -> None:
    name = meta.name or f.name
    default = defaults.get(name, _default(f))
    required = default is MISSING
    kwargs: dict[str, Any] = dict(dest=name, help=_help(f, meta))
    if isinstance(meta.spec, Flag):
        if default is True and not (meta.flag or "").startswith("--no-"):
            raise TypeError(f"{cls.__name__}.{f.name}: a boolean option that defaults to True needs a --no-... flag")
        kwargs.update(action="store_false" if default is True else "store_true", default=default)
    else:
        kwargs.update(type=meta.spec.parse, default=None if required else default, required=required)
        if isinstance(meta.spec, Choice):
            kwargs.update(choices=meta.spec.values, type=str)
        for key in ("metavar", "nargs", "const"):
            if getattr(meta, key) is not None:
                kwargs[key] = getattr(meta, key)
    target.add_argument(meta.flag or "--" + name.replace("_", "-"), *meta.aliases, **kwargs)


def option_names(cls: type) -> set[str]:
    """The namespace keys :func:`add_arguments` creates for ``cls``."""
    return {meta.name or f.name for f, meta in options_of(cls) if meta.cli}

