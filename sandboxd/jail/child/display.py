"""Figures a run or a cell shows, saved as PNG files for the daemon to return.

With ``display: true`` the run's matplotlib backend is ``module://sandboxd_display``:
a module this finder makes on demand from matplotlib's own Agg backend, whose
``show()`` saves every open figure into DISPLAY_DIR and closes it (as a notebook
does).  Figures still open when the code ends are saved the same way.  Without
``display`` runs get plain Agg (``MPLBACKEND`` in their environment): nothing is
drawn anywhere.  It runs in R, confined; what it saves is the run's own data.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import importlib.abc

from .contract import DISPLAY_DIR

BACKEND = "sandboxd_display"
_saved = [0]


def install() -> None:
    """Make ``module://sandboxd_display`` importable and the run's matplotlib backend."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    os.environ["MPLBACKEND"] = f"module://{BACKEND}"


def save_open_figures() -> None:
    """Save (and close) the figures still open, if pyplot is in use at all.  (Before the
    interpreter's atexit handlers: matplotlib's closes every figure.)"""
    if "matplotlib.pyplot" in sys.modules:
        try:
            show()
        except Exception:  # noqa: BLE001 - a figure that cannot be drawn is the user's, not ours
            pass


def saved() -> int:
    """How many figures this process has saved so far (a cell's report says it: the daemon
    looks for new ones only when the count moved)."""
    return _saved[0]


def show(*args: Any, **kwargs: Any) -> None:
    """pyplot.show(): every open figure becomes a PNG, then it is closed."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    os.makedirs(DISPLAY_DIR, mode=0o700, exist_ok=True)
    for num in plt.get_fignums():
        if _saved[0] < 10**6:
            _saved[0] += 1
            figure = plt.figure(num)
            figure.savefig(os.path.join(DISPLAY_DIR, f"{_saved[0]:06d}.png"), format="png")
    plt.close("all")


class _Loader:  # a loader by protocol: importlib.abc would bring importlib.resources, tempfile, random…
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        agg = importlib.import_module("matplotlib.backends.backend_agg")
        module.FigureCanvas = agg.FigureCanvasAgg  # type: ignore[attr-defined]
        module.FigureManager = agg.FigureManagerBase  # type: ignore[attr-defined]
        module.show = show  # type: ignore[attr-defined]


class _Finder:  # a meta path finder by protocol (find_spec)
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != BACKEND:
            return None
        return importlib.machinery.ModuleSpec(name, cast("importlib.abc.Loader", _Loader()))
