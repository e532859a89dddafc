"""Provenance for every result file: command, commit, device, library versions, date."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

__all__ = ["provenance", "gpu_slug", "write_results"]


def _commit() -> str:
    env = os.environ.get("TNLIB_COMMIT")  # set by callers on machines that get a copy without .git
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _command() -> str:
    """This process's command line as typed in the repository: ``python -m tnlib ...`` for the package's
    entry point (whose argv[0] is the absolute path of ``__main__.py``), scripts relative to the working
    directory."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("tnlib", "__main__.py")):
        argv[:1] = ["-m", "tnlib"]
    elif argv and os.path.isabs(argv[0]) and argv[0].startswith(os.getcwd() + os.sep):
        argv[0] = os.path.relpath(argv[0])
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + argv)


def gpu_slug(name: str | None = None) -> str:
    """``'NVIDIA H200'`` -> ``'h200'`` (for result file names); ``'cpu'`` without a GPU."""
    import torch

    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return "-".join(words) or "gpu"


def provenance(extra: dict | None = None) -> dict:
    """A header dict: command, commit, gpu, torch/triton/python versions, UTC date (plus ``extra``)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "command": _command(),
        "commit": _commit(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        info.update(extra)
    return info


def write_results(path: str, rows: list, extra: dict | None = None) -> None:
    """Write a benchmark result file ``{"header": provenance(extra), "rows": rows}`` (folders created).
    Scripts call it after every row, so a run cut short still leaves what it measured."""
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"header": provenance(extra), "rows": rows}, f, indent=1)
