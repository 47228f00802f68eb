"""Trainer state on disk without pickle: a JSON tree plus one safetensors file of its tensors.

``torch.save``/``torch.load(weights_only=False)`` would let a crafted checkpoint run code on
``--resume``. Instead :func:`save_state` writes

* ``<stem>.json`` — the nested structure (dicts, lists, numbers, strings, booleans, None) where
  every tensor is replaced by ``{"__tensor__": "t<k>"}``, and
* ``<stem>.safetensors`` — those tensors by key (dtype and shape kept exactly),

and :func:`load_state` reads them back. Reading can only ever build the plain types below and the
record types registered in :data:`RECORD_TYPES`; anything else in the file is a
:class:`StateFileError` naming the file. The tags used in the JSON tree:

=================================  ==============================================================
Python value                       JSON
=================================  ==============================================================
``torch.Tensor``                   ``{"__tensor__": key}`` (the tensor in the safetensors file)
``tuple``                          ``{"__tuple__": [...]}``
dict with non-string keys (or a    ``{"__dict__": [[key, value], ...]}``
key that looks like a tag)
``numpy.ndarray``                  ``{"__ndarray__": {"dtype": str, "shape": [...], "data": [...]}}``
a registered record (dataclass)    ``{"__record__": name, "fields": {...}}``
=================================  ==============================================================

Floats round-trip exactly (JSON numbers are written with ``repr``); NaN and infinities are
written as the ``NaN``/``Infinity`` literals Python's ``json`` module reads back. That is enough
for Python's ``random.getstate()`` (a tuple of ints), NumPy's legacy ``get_state()`` (a tuple with
a ``uint32`` array), torch/CUDA generator states (``uint8`` tensors), optimizer and scheduler
state dicts, :class:`~dftkern.DFTState` and the on-policy window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["StateFileError", "RECORD_TYPES", "register_record", "save_state", "load_state", "state_files"]

FORMAT = "dftkern-state"
VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__record__")
_NDARRAY_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32",
                   "float64")

RECORD_TYPES: dict[str, type] = {}
"""Dataclasses that may appear in a state file, by name (see :func:`register_record`)."""


class StateFileError(ValueError):
    """A state file that cannot be read back: missing, truncated, foreign or malformed (the message names it)."""


def register_record(cls: type) -> type:
    """Allow instances of the dataclass ``cls`` in state files (stored field by field). Usable as a decorator."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    RECORD_TYPES[cls.__name__] = cls
    return cls


def state_files(stem: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>.json, <stem>.safetensors)``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}  # id(tensor) -> key: a tensor listed twice is stored once

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, torch.Tensor):
            key = self._keys.get(id(value))
            if key is None:
                key = self._keys[id(value)] = f"t{len(self.tensors)}"
                self.tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            if value.dtype.name not in _NDARRAY_DTYPES:
                raise TypeError(f"{where}: cannot store a numpy array of dtype {value.dtype} in a state file")
            return {"__ndarray__": {"dtype": value.dtype.name, "shape": list(value.shape),
                                    "data": value.reshape(-1).tolist()}}
        if isinstance(value, np.generic):
            return self.encode(value.item(), where)
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
                return {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__dict__": [[self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")]
                                 for k, v in value.items()]}
        if dataclasses.is_dataclass(value) and RECORD_TYPES.get(type(value).__name__) is type(value):
            return {"__record__": type(value).__name__,
                    "fields": {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}")
                               for f in dataclasses.fields(value)}}
        raise TypeError(f"{where}: cannot store a {type(value).__name__} in a state file (plain data, tensors, "
                        f"numpy arrays and the records {sorted(RECORD_TYPES)} only)")


def save_state(stem: str | os.PathLike, state: Any) -> tuple[Path, Path]:
    """Write ``state`` as ``<stem>.json`` + ``<stem>.safetensors``; returns both paths.

    Raises:
        TypeError: ``state`` holds a value that is not plain data, a tensor, a numpy array or a
            registered record (nothing is written then).
    """
    from safetensors.torch import save_file

    encoder = _Encoder()
    tree = encoder.encode(state, "state")
    json_path, tensor_path = state_files(stem)
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": tree})
    save_file(encoder.tensors, str(tensor_path), metadata={"format": FORMAT})
    json_path.write_text(text, encoding="utf-8")
    return json_path, tensor_path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


class _Decoder:
    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors = path, tensors

    def fail(self, where: str, message: str) -> StateFileError:
        return StateFileError(f"{self.path}: {where}: {message}")

    def decode(self, node: Any, where: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.fail(where, f"unexpected JSON value of type {type(node).__name__}")
        tags = [k for k in node if k in _TAGS]
        if not tags:
            return {k: self.decode(v, f"{where}.{k}") for k, v in node.items()}
        tag = tags[0]
        if len(node) != (2 if tag == "__record__" else 1):
            raise self.fail(where, f"malformed {tag} entry {sorted(node)}")
        body = node[tag]
        if tag == "__tensor__":
            if not isinstance(body, str) or body not in self.tensors:
                raise self.fail(where, f"refers to tensor {body!r}, which the tensor file does not hold")
            return self.tensors[body]
        if tag == "__tuple__":
            if not isinstance(body, list):
                raise self.fail(where, "__tuple__ must hold a list")
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == "__dict__":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                raise self.fail(where, "__dict__ must hold [key, value] pairs")
            out = {}
            for key, value in body:
                key = self.decode(key, f"{where} key")
                try:
                    out[key] = self.decode(value, f"{where}[{key!r}]")
                except TypeError:  # an unhashable key (a list)
                    raise self.fail(where, f"unusable dictionary key {key!r}") from None
            return out
        if tag == "__ndarray__":
            return self._ndarray(body, where)
        return self._record(node, where)

    def _ndarray(self, body: Any, where: str) -> np.ndarray:
        if not isinstance(body, dict) or set(body) != {"dtype", "shape", "data"}:
            raise self.fail(where, "__ndarray__ needs exactly 'dtype', 'shape' and 'data'")
        if body["dtype"] not in _NDARRAY_DTYPES:
            raise self.fail(where, f"numpy dtype {body['dtype']!r} is not one of {_NDARRAY_DTYPES}")
        shape, data = body["shape"], body["data"]
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(data, list) and len(data) == math.prod(shape)
                and all(isinstance(v, (int, float)) for v in data)):
            raise self.fail(where, "__ndarray__ shape/data do not fit together")
        try:
            return np.asarray(data, dtype=body["dtype"]).reshape(shape)
        except (OverflowError, ValueError) as err:
            raise self.fail(where, f"bad numpy data ({err})") from None

    def _record(self, node: dict, where: str) -> Any:
        name, fields = node["__record__"], node.get("fields")
        cls = RECORD_TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise self.fail(where, f"unknown record type {name!r} (known: {sorted(RECORD_TYPES)})")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        required = {f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        # fields added later with a default may be absent (files written before they existed)
        if not isinstance(fields, dict) or not required <= set(fields) <= known:
            got = sorted(fields) if isinstance(fields, dict) else fields
            raise self.fail(where, f"record {name} needs the fields {sorted(required)} (and may have "
                                   f"{sorted(known - required)}), got {got}")
        values = {k: self.decode(v, f"{where}.{k}") for k, v in fields.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise self.fail(where, f"invalid {name} record ({err})") from None


def load_state(stem: str | os.PathLike) -> Any:
    """Read a state written by :func:`save_state` (tensors on CPU). Never unpickles anything.

    Raises:
        StateFileError: a file is missing, truncated, not in this format, or holds anything but the
            plain types and registered records (the message names the file and the entry).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, tensor_path = state_files(stem)
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise StateFileError(f"{path}: missing")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise StateFileError(f"{json_path}: not a UTF-8 text file (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise StateFileError(f"{json_path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                             f"the file is truncated or was not written by dftkern") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or "state" not in document:
        raise StateFileError(f"{json_path}: not a dftkern state file (no format {FORMAT!r} header)")
    if document.get("version") != VERSION:
        raise StateFileError(f"{json_path}: state file version {document.get('version')!r}, this dftkern reads "
                             f"version {VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateFileError(f"{tensor_path}: cannot read the tensors ({err}); the file is truncated or was "
                             f"not written by dftkern") from None
    return _Decoder(json_path, tensors).decode(document["state"], "state")
