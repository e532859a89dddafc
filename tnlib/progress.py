"""Progress bars: widgets in a live Jupyter frontend, plain text everywhere else.

``tqdm.auto`` draws an ipywidgets bar whenever the code runs in an IPython kernel, also when a notebook
is executed headless (``nbconvert``, ``nbval``, CI). Nobody watches those widgets; saved into the
notebook they render as stuck "0%" bars. ``tqdm`` here picks the widget bar only in a kernel started
by a Jupyter server (JupyterLab / Notebook set ``JPY_SESSION_NAME`` for their kernels), and tqdm's
text bar otherwise (a terminal, a script, a headless execution).

``quiet_datasets()`` turns off the ``datasets`` library's own bars and info lines ("Generating train
split"): reading our local sample files takes a second, and our own bars report the real work.
"""
from __future__ import annotations

import os
import sys

__all__ = ["tqdm", "interactive_notebook", "quiet_datasets"]


def interactive_notebook() -> bool:
    """Whether we run in an IPython kernel that a Jupyter server started for a live frontend."""
    return "ipykernel" in sys.modules and bool(os.environ.get("JPY_SESSION_NAME"))


def tqdm(*args, **kwargs):
    """A ``tqdm`` bar: a widget in a live notebook, text otherwise (same arguments as ``tqdm.tqdm``)."""
    if interactive_notebook():
        from tqdm.auto import tqdm as bar
    else:
        from tqdm.std import tqdm as bar
    return bar(*args, **kwargs)


def quiet_datasets() -> None:
    """No progress bars or info lines from ``datasets`` (if it is installed)."""
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
