"""Typed config fields: every value that enters a config dataclass is checked against its field's type.

``check_fields(cfg, choices)`` is called by ``ModelConfig.__post_init__`` and
``TrainConfig.__post_init__``. It reads the dataclass's annotations, so a new field is covered as soon
as it is declared. Values may come from Python or as strings from the command line; each is parsed
into the field's type or rejected with an error that names the field, the value and what is allowed:

* ``bool``: ``True``/``False``; the strings ``true``/``false`` in any case; ``1``/``0`` (int or
  string, as in shell variables). Anything else (``"maybe"``, ``2``, ``"yes"``) is an error, so
  ``gate="False"`` can never turn on the gate by being a non-empty string.
* ``int``: ints, integral floats (``1e3``), or strings that parse as such; never a bool.
* ``float``: ints, floats, or strings that parse as a float; never a bool.
* ``str``: strings; when the field is in ``choices``, only the allowed values.
* ``tuple``: tuples or lists; a string is split at commas (``val,eval-heldout``).
* ``dict``: dicts only.
* ``X | None``: ``None``, or the strings ``none``/``null`` in any case, or an ``X``.
"""
from __future__ import annotations

import dataclasses
import types
import typing

__all__ = ["check_fields", "parse_field"]

_TRUE, _FALSE = ("true", "1"), ("false", "0")
_NONE = ("none", "null")


def _fail(owner: str, name: str, value, allowed: str):
    raise ValueError(f"{owner}.{name}={value!r}: expected {allowed}")


def _parse(owner: str, name: str, tp, value, choices):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        if len(args) == 1:
            return _parse(owner, name, args[0], value, choices)
        return value  # unions of several types: not used by our configs, accepted as given
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        _fail(owner, name, value, "a boolean: true or false (any case), or 1 or 0")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    value_f = float(value)
            elif isinstance(value, float):
                value_f = value
            else:
                raise ValueError
            if value_f.is_integer():
                return int(value_f)
        except (ValueError, OverflowError):
            pass
        _fail(owner, name, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail(owner, name, value, "a number")
    if tp is str:
        if not isinstance(value, str):
            _fail(owner, name, value, f"one of {choices[name]}" if name in choices else "a string")
        if name in choices and value not in choices[name]:
            _fail(owner, name, value, f"one of {choices[name]}")
        return value
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, (list, tuple)):
            return tuple(value)
        _fail(owner, name, value, "a tuple or list (or a comma-separated string)")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        _fail(owner, name, value, "a dict")
    return value  # a type we do not check (none in our configs)


def parse_field(cls, name: str, value, choices: dict | None = None):
    """``value`` parsed into the type of ``cls``'s field ``name`` (ValueError if it does not fit)."""
    hints = typing.get_type_hints(cls)
    return _parse(cls.__name__, name, hints[name], value, choices or {})


def check_fields(cfg, choices: dict | None = None) -> None:
    """Parse every field of the dataclass instance ``cfg`` in place into its declared type; string
    fields named in ``choices`` must hold one of the listed values."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = _parse(type(cfg).__name__, f.name, hints[f.name], getattr(cfg, f.name), choices or {})
        setattr(cfg, f.name, value)
