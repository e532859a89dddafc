"""Reading the files tnlib did not just write: every reader checks what it opens.

Weights (safetensors, official ``.bin`` shards), JSON files (``config.json``, an index, ``meta.json``)
and torch files (a training checkpoint's ``state.pt``) may be truncated, empty, overwritten with
something else, or hold the wrong keys and shapes. The readers here turn each of those into
:class:`FileDamaged`, one line that names the file, what is wrong and what to do, instead of a
traceback from deep inside a parser. Nothing they read can run code: torch files are unpickled with
``weights_only=True`` (tensors and plain values only), safetensors and JSON hold no code.

``python -m tnlib`` prints the error as ``error: <file>: <what is wrong> (<what to do>)`` and exits
with status 2.
"""
from __future__ import annotations

import json
import os
import re

__all__ = ["FileDamaged", "read_json", "safetensors_header", "load_weights", "read_torch_file",
           "set_default_mode"]


class FileDamaged(ValueError):
    """A file tnlib reads is truncated, empty, in another format, or holds content that cannot be what
    the file should hold (missing or unknown keys, wrong shapes or types).

    ``str(e)`` is one line, ``<path>: <problem> (<remedy>)``; the parts are ``e.path``, ``e.problem``
    and ``e.remedy``. A ``ValueError``, so code that catches bad values also catches it."""

    def __init__(self, path, problem: str, remedy: str):
        self.path, self.problem, self.remedy = str(path), _one_line(problem), _one_line(remedy)
        super().__init__(f"{self.path}: {self.problem} ({self.remedy})")


def _one_line(text, limit: int = 300) -> str:
    """The first non-empty line of ``text`` without terminal escapes, at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_readable(path: str, remedy: str) -> int:
    """The size of the file at ``path``; a directory or an empty file raises :class:`FileDamaged`."""
    if os.path.isdir(path):
        raise FileDamaged(path, "is a directory, not a file", remedy)
    size = os.path.getsize(path)  # a missing file raises FileNotFoundError, which names it
    if size == 0:
        raise FileDamaged(path, "is empty (0 bytes)", remedy)
    return size


def read_json(path, remedy: str, kind: type = dict):
    """The JSON value in ``path``, which must be a ``kind`` (a JSON object by default). Text that is not
    UTF-8 or not JSON, an empty file or another top-level type raises :class:`FileDamaged`."""
    path = os.fspath(path)
    _check_readable(path, remedy)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError:
        raise FileDamaged(path, "is not UTF-8 text, so not JSON", remedy) from None
    except json.JSONDecodeError as e:
        raise FileDamaged(path, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; "
                                f"truncated or overwritten?)", remedy) from None
    if not isinstance(value, kind):
        want = {dict: "an object", list: "an array"}.get(kind, kind.__name__)
        raise FileDamaged(path, f"holds a JSON {type(value).__name__}, expected {want}", remedy)
    return value


def _safetensors_problem(message: str) -> str:
    if "not fully covered" in message or "incomplete" in message:
        return "is truncated: its header describes more data than the file holds"
    if "header too" in message or "invalid header" in message or "HeaderTooLarge" in message:
        return "is not a safetensors file: its header cannot be read"
    return f"is not a readable safetensors file ({_one_line(message)})"


def safetensors_header(path, remedy: str) -> dict:
    """``{key: (shape, dtype)}`` of a safetensors file (dtype as safetensors names it, e.g. ``"F32"``),
    from its header alone. The header and the data's extent are checked when the file is opened, so a
    truncated, empty or foreign file raises :class:`FileDamaged` here, before any tensor is read."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_readable(path, remedy)
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
            return out
    except Exception as e:  # safetensors raises its own SafetensorError (not importable as a stable name)
        raise FileDamaged(path, _safetensors_problem(str(e)), remedy) from None


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def load_weights(model, path, remedy: str, device="cpu") -> None:
    """Load ``path`` (a safetensors file written by ``safetensors.torch.save_model``) into ``model``.

    Every key, shape and dtype is checked against ``model.state_dict()`` first, so a file with missing
    or unknown keys, other shapes or non-float weights raises :class:`FileDamaged` naming the first
    few, and the model is left untouched."""
    import torch
    from safetensors.torch import load_model

    stored = safetensors_header(path, remedy)
    expected = model.state_dict()  # tnlib's models share no storage between entries (a tied head is None)
    missing = [k for k in expected if k not in stored]
    unknown = sorted(set(stored) - set(expected))
    if missing:
        raise FileDamaged(path, f"lacks {len(missing)} of the model's tensors ({_few(missing)})", remedy)
    if unknown:
        raise FileDamaged(path, f"holds {len(unknown)} tensors the model does not have ({_few(unknown)})", remedy)
    for k, (shape, dtype) in stored.items():
        want = expected[k]
        if shape != tuple(want.shape):
            raise FileDamaged(path, f"{k!r} has shape {list(shape)}, the model's is {list(want.shape)}",
                              remedy)
        if want.is_floating_point() and dtype not in _FLOAT_DTYPES:
            raise FileDamaged(path, f"{k!r} is stored as {dtype}, not as floating point", remedy)
    try:
        with torch.no_grad():
            load_model(model, path, strict=True, device=str(device))
    except Exception as e:  # the header was sound: the data itself cannot be read
        raise FileDamaged(path, f"cannot be read ({_one_line(e)})", remedy) from None


def _few(names, n: int = 3) -> str:
    return ", ".join(map(repr, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_torch_file(path, remedy: str, mmap: bool = False, part: tuple[int, int] | None = None):
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, so the file cannot
    run code. A pickled object of any other type is refused (named in the error), and a truncated, empty
    or foreign file raises :class:`FileDamaged`. ``mmap``: memory-map the tensors (zip format only;
    the legacy format is read whole). ``part``: ``(offset, length)`` of the bytes to read, for files
    that hold several torch objects (``torch.distributed.checkpoint``'s)."""
    import io
    import pickle

    import torch

    path = os.fspath(path)
    _check_readable(path, remedy)
    source = path
    if part is not None:
        with open(path, "rb") as f:
            f.seek(part[0])
            source = io.BytesIO(f.read(part[1]))
    try:
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(source, map_location="cpu", weights_only=True)  # legacy format: not mappable
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise FileDamaged(path, f"holds a {found.group(1)} object, not only tensors and plain values; refused, "
                                    f"since loading it could run code", remedy) from None
        raise FileDamaged(path, f"is not a torch file of tensors and plain values ({_weights_only_reason(e)})",
                          remedy) from None
    except EOFError:
        raise FileDamaged(path, "ends too early: truncated", remedy) from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "central directory" in str(e):
            raise FileDamaged(path, "is truncated or not a torch file: its zip archive cannot be read", remedy) from None
        raise FileDamaged(path, f"cannot be read as a torch file ({_one_line(e)})", remedy) from None
    except Exception as e:  # any other parser error of a damaged file
        raise FileDamaged(path, f"cannot be read as a torch file ({_one_line(e)})", remedy) from None


def _weights_only_reason(e) -> str:
    """What torch's weights-only refusal found (its first lines are advice about trusting the file)."""
    text = str(e)
    for marker in ("WeightsUnpickler error:", "invalid load key"):
        if marker in text:
            return _one_line(text.split("WeightsUnpickler error:", 1)[-1]) or marker
    return _one_line(text)


def set_default_mode(path) -> None:
    """Give ``path`` the permissions a file created with ``open(path, "w")`` gets (``0o666`` minus the
    umask): safetensors writes its files with ``0o600``, every other file tnlib writes gets this."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it (and put it back at once)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
