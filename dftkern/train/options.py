"""Options declared once: a config dataclass field carries its default, help text, accepted values and
command-line flag; validation and the command line are both generated from it.

    lr: float = option(1e-5, Number(low=0, low_open=True), "peak learning rate")

* :func:`validate` checks (and normalizes) every option of a config instance in ``__post_init__``:
  booleans must be ``bool``, integers ``int`` (not ``bool``), numbers finite and inside their
  range, choices one of theirs; the error names the field and says the accepted values, e.g.
  ``lr must be > 0 (a finite number), got inf``.
* :func:`add_arguments` adds one argparse option per field (``--lr``; ``--no-X`` for a boolean
  whose default is True; both ``--X`` and ``--no-X`` for an optional boolean whose default None
  means "automatic"), whose parser applies the same :class:`Spec`, with the help text and the
  ``(default: ...)`` taken from the field; :func:`option_names` lists the names the parsed
  namespace holds, so the stage config is built without reading argparse internals.

Configs compose: a field declared with :func:`nested` holds another config (``TrainConfig.optim``
is an ``OptimConfig``) whose options keep their own flat names (``lr``, ``sample_temperature``). A
config deriving from :class:`FlatKeywords` accepts those flat names as keyword arguments too, so
``TrainConfig(model="m", data="d", out="o", lr=1e-4)`` and
``TrainConfig(model=ModelConfig("m"), data="d", out="o", optim=OptimConfig(lr=1e-4))`` are the same
config; :func:`flat_values` gives the flat view back (what the command line and ``train_config.json``
use).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import MISSING, dataclass
from typing import Any

from dftkern._validation import ArgumentTypeError

__all__ = ["Spec", "Integer", "Number", "Choice", "Flag", "Text", "Device", "AnyOf", "Function", "Option", "option",
           "Nested", "nested", "FlatKeywords", "options_of", "validate", "add_arguments", "option_names", "flat_values"]


# ---------------------------------------------------------------------------------------------
# accepted values
# ---------------------------------------------------------------------------------------------


class Spec:
    """The values one option accepts. ``optional``: None is accepted too (meaning "unset")."""

    optional: bool = False
    types: tuple = ()  # the Python types a value may have (empty: any); bool is never an int here

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
            error = ArgumentTypeError if not self.right_type(value) else ValueError
            raise error(f"{label} must be {self.describe()}{unset}, got {value!r}" + (f": {why}" if why else ""))
        return normalized

    def right_type(self, value: Any) -> bool:
        """Whether ``value``'s type could be accepted (a wrong value of the right type is a plain ValueError)."""
        if not self.types:
            return True
        return isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)

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


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _bounds(low, high, low_open: bool, high_open: bool, kind: str) -> str:
    if low is not None and high is not None:
        return f"in {_interval(low, high, low_open, high_open)} ({kind})"
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
    types: tuple = (int,)

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
    types: tuple = (int, float)

    def describe(self) -> str:
        return self.text or _bounds(self.low, self.high, self.low_open, self.high_open,
                                    "a number" if self.low is not None and self.high is not None
                                    else "a finite number")

    def interval(self) -> str:
        """``"[low, high)"`` (both bounds must be set)."""
        return _interval(self.low, self.high, self.low_open, self.high_open)

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
    types: tuple = (str,)

    def describe(self) -> str:
        return f"one of {self.values}"

    def accept(self, value):
        return isinstance(value, str) and value in self.values, value


@dataclass(frozen=True)
class Flag(Spec):
    """A ``bool`` (``True``/``False`` only: ``"no"`` or ``1`` are refused).

    ``optional=True``: None is accepted too, meaning "decide automatically"; on the command line
    such an option (default None) gets both ``--X`` (True) and ``--no-X`` (False).
    """

    optional: bool = False
    types: tuple = (bool,)

    def describe(self) -> str:
        return "True or False (a bool)"

    def accept(self, value):
        return isinstance(value, bool), value


@dataclass(frozen=True)
class Text(Spec):
    """A non-empty string (a path, a device name, ...)."""

    optional: bool = False
    types: tuple = (str,)

    def describe(self) -> str:
        return "a non-empty string"

    def accept(self, value):
        return isinstance(value, str) and bool(value.strip()), value


@dataclass(frozen=True)
class Device(Spec):
    """``"auto"`` or a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""

    types: tuple = (str,)

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

    def right_type(self, value) -> bool:
        return any(spec.right_type(value) for spec in self.specs)

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
    return dataclasses.field(default=default, metadata={"option": Option(spec=spec, help=help, **meta)})


@dataclass(frozen=True)
class Nested:
    """Field metadata of a sub-config (see :func:`nested`)."""

    cls: type
    optional: bool = False
    help: str = ""  # optional sub-configs: help of the flag that turns them on (``--on-policy``)
    group: str | None = None
    help_for: tuple[tuple[str, str], ...] = ()  # (flat name, help) overriding the sub-config's own help
    unused_hint: str = ""  # added to the error when options of a disabled optional sub-config are given


def nested(cls: type, *, optional: bool = False, help: str = "", group: str | None = None,
           help_for: dict[str, str] | None = None, unused_hint: str = "", default_factory=None) -> Any:
    """A field holding a ``cls`` config whose options appear under their own flat names.

    ``optional``: the field may be None (off); its flat name is then also a boolean keyword/flag
    turning it on (``on_policy=True`` / ``--on-policy``). Otherwise a value that is not a ``cls``
    sets the sub-config option of the same flat name (``model="dir"`` sets ``ModelConfig.path``).
    """
    metadata = {"nested": Nested(cls, optional, help, group, tuple((help_for or {}).items()), unused_hint)}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def _flat_to_field(cls: type) -> dict[str, str]:
    """``{flat name: field name}`` of the options declared directly on ``cls``."""
    return {meta.name or f.name: f.name for f, meta in options_of(cls)}


class FlatKeywords:
    """Mixin for a ``@dataclass(init=False)`` config with :func:`nested` fields: its ``__init__``
    takes the fields themselves and/or the nested configs' options as flat keywords (see the module
    docstring), then runs ``__post_init__``. Positional arguments fill the fields in order."""

    def __init__(self, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(self)]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            kwargs[name] = value
        for name, value in _compose(type(self), kwargs).items():
            object.__setattr__(self, name, value)
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()


def _compose(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nest = f.metadata.get("nested")
        if nest is None:
            if f.name in kwargs:
                values[f.name] = kwargs.pop(f.name)
            elif _default(f) is not MISSING:
                values[f.name] = _default(f)
            else:
                raise TypeError(f"{cls.__name__}() missing required argument {f.name!r}")
            continue
        flat_names = option_names(nest.cls)
        given = kwargs.pop(f.name, MISSING)
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in flat_names}
        if isinstance(given, nest.cls):
            if flat:
                raise TypeError(f"{cls.__name__}(): give {sorted(flat)} inside {f.name}={nest.cls.__name__}(...) or as "
                                f"keywords, not both")
            values[f.name] = given
        elif nest.optional:
            if given not in (MISSING, None, True, False):
                raise ValueError(f"{f.name} must be True, False, None or an {nest.cls.__name__}, got {given!r}")
            values[f.name] = _build(nest.cls, flat) if given is True else _unused(f.name, nest, flat)
        else:
            if given is not MISSING:
                flat[f.name] = given
            if not flat and _default(f) is MISSING:
                raise TypeError(f"{cls.__name__}() missing required argument {f.name!r}")
            values[f.name] = _build(nest.cls, flat) if flat else _default(f)
    if kwargs:
        raise TypeError(f"{cls.__name__}() got unexpected keyword arguments {sorted(kwargs)}")
    return values


def _build(cls: type, flat: dict[str, Any]) -> Any:
    to_field = _flat_to_field(cls)
    return cls(**{to_field.get(k, k): v for k, v in flat.items()})


def _unused(name: str, nest: Nested, flat: dict[str, Any]) -> None:
    """A disabled optional sub-config: its flat options must be unset (None) or at their defaults."""
    defaults = {meta.name or f.name: _default(f) for f, meta in options_of(nest.cls)}
    changed = {k: v for k, v in flat.items() if v is not None and v != defaults.get(k)}
    if changed:
        listed = ", ".join(f"{k}={v!r} (--{k.replace('_', '-')})" for k, v in changed.items())
        raise ValueError(f"{listed}: only used with {name}=True (--{name.replace('_', '-')}){nest.unused_hint}")
    return None


def flat_values(obj) -> dict[str, Any]:
    """The flat view of a config: every option under its flat name (a disabled optional sub-config:
    its switch False and its options at their defaults); callables are replaced by their names."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        nest = f.metadata.get("nested")
        value = getattr(obj, f.name)
        if nest is None:
            meta = f.metadata.get("option")
            out[(meta.name if meta is not None else None) or f.name] = _plain(value)
            continue
        if nest.optional:
            out[f.name] = value is not None
        if value is None:
            out.update({meta.name or g.name: _plain(None if _default(g) is MISSING else _default(g))
                        for g, meta in options_of(nest.cls)})
        else:
            out.update(flat_values(value))
    return out


def _plain(value: Any) -> Any:
    """A JSON-friendly value: a callable becomes its name (see :func:`~.rewards.reward_name`)."""
    if callable(value):
        from .rewards import reward_name

        return reward_name(value)
    return value


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


def _help(f: dataclasses.Field, meta: Option, help: str | None = None) -> str:
    default = _default(f)
    if meta.default_text is not None:
        shown = meta.default_text
    elif default is MISSING or default is None or isinstance(meta.spec, Flag):
        shown = ""
    else:
        shown = str(default)
    text = help or meta.help
    return f"{text} (default: {shown})" if shown else text


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, groups: dict[str, str] | None = None,
                  defaults: dict[str, Any] | None = None) -> None:
    """Add every command-line option of the config ``cls`` (nested configs included) to ``parser``.

    Args:
        groups: argument-group titles by :attr:`Option.group` key (options without a group go to
            ``parser`` itself); one group per key.
        defaults: command-line defaults that differ from the field defaults (e.g. None meaning
            "not given", for options applied as overrides).
    """
    made: dict[str, Any] = {}

    def target(group: str | None):
        if group is None:
            return parser
        if group not in made:
            made[group] = parser.add_argument_group((groups or {}).get(group, group))
        return made[group]

    def visit(config: type, help_for: dict[str, str], optional: bool) -> None:
        for f in dataclasses.fields(config):
            nest, meta = f.metadata.get("nested"), f.metadata.get("option")
            if nest is not None:
                if nest.optional:
                    target(nest.group).add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                                                    help=nest.help)
                visit(nest.cls, dict(nest.help_for), nest.optional)
            elif meta is not None and meta.cli:
                name = meta.name or f.name
                default = (defaults or {}).get(name, _default(f))
                if optional and default is MISSING:  # the whole sub-config is optional on the command line
                    default = None
                _add_argument(target(meta.group), config, f, meta, default, help_for.get(name))

    visit(cls, {}, False)


def _add_argument(target, cls: type, f: dataclasses.Field, meta: Option, default: Any, help: str | None) -> None:
    name = meta.name or f.name
    required = default is MISSING
    kwargs: dict[str, Any] = dict(dest=name, help=_help(f, meta, help))
    if isinstance(meta.spec, Flag) and default is None:  # tri-state: --X / --no-X / neither (automatic)
        kwargs.update(action=argparse.BooleanOptionalAction, default=None)
    elif isinstance(meta.spec, Flag):
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
    """The flat names of ``cls``'s options (nested configs and their on-switches included): the keys
    :func:`add_arguments` creates and the flat keywords a :class:`FlatKeywords` config accepts."""
    names = set()
    for f in dataclasses.fields(cls):
        nest, meta = f.metadata.get("nested"), f.metadata.get("option")
        if nest is not None:
            names |= option_names(nest.cls) | ({f.name} if nest.optional else set())
        elif meta is not None:
            names.add(meta.name or f.name)
    return names

