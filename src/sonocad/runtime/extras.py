"""sonocad's optional parts (extras): which packages each needs, and one check a command runs before any work.

>>> require("serve", "sonocad serve")    # without fastapi and uvicorn:   # doctest: +SKIP
sonocad.errors.MissingExtra: sonocad serve needs fastapi, uvicorn (not installed): pip install 'sonocad[serve]' ...
"""
from __future__ import annotations

import importlib.util

from ..errors import MissingExtra

# extra -> {module it imports as: distribution pip installs}; pyproject.toml's [project.optional-dependencies]
# declares the same (tests/test_extras.py checks that the two agree)
EXTRAS: dict[str, dict[str, str]] = {
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"},
    "onnx": {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"},
    "dicom": {"pydicom": "pydicom"},
    "faiss": {"faiss": "faiss-cpu"},
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The distributions of `extra` (only those of `modules`, when given) whose module cannot be found."""
    wanted = EXTRAS[extra]
    names = modules if modules is not None else tuple(wanted)
    return [wanted[m] for m in names if _absent(m)]


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):      # a broken install, or sys.modules[module] = None
        return True


def install_hint(extra: str) -> str:
    return f"pip install 'sonocad[{extra}]' (from a clone: pip install -e '.[{extra}]')"


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtra, one line naming what is missing and how to install it, when a package of `extra`
    (of `modules`, when given) is not installed. `what` names the work that needs it."""
    gone = missing(extra, modules)
    if gone:
        raise MissingExtra(extra, f"{what} needs {', '.join(gone)} (not installed): {install_hint(extra)}")
