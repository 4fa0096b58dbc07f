"""Models shipped with sonocad: finished run directories inside the package, used by name wherever a run is
expected (`sonocad predict bus-base scan.png`, `sonocad train DATA --init bus-base`). Each version of a model
lives in zoo/NAME/VERSION/: `bus-base` names the newest, `bus-base@1` a version for good. A path that exists
always wins over a shipped name.

>>> resolve("bus-base@1")                   # doctest: +SKIP
PosixPath('.../sonocad/zoo/bus-base/1')
>>> shipped_version(resolve("bus-base"))    # doctest: +SKIP
'bus-base@1'
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SonocadError

HERE = Path(__file__).resolve().parent


def versions(name: str) -> list[str]:
    """The shipped versions of model `name`, oldest first (empty for a name that is not shipped)."""
    folder = HERE / name
    if not folder.is_dir() or name.startswith(("_", ".")):
        return []
    found = [p.name for p in folder.iterdir() if p.name.isdigit() and (p / "config.json").is_file()]
    return sorted(found, key=int)


def names() -> list[str]:
    """Every name a shipped model answers to: each model (its newest version) and each `model@version`."""
    models = sorted(p.name for p in HERE.iterdir() if p.is_dir() and versions(p.name))
    return models + [f"{m}@{v}" for m in models for v in versions(m)]


def resolve(run: str | Path) -> Path:
    """`run` as a path: a shipped model's folder when `run` is its name (`bus-base`: the newest version;
    `bus-base@1`: version 1) and no such path exists. An unknown version of a shipped model is a one-line
    error naming the known ones."""
    path = Path(run)
    if path.exists() or "/" in str(run):
        return path
    name, _, version = str(run).partition("@")
    known = versions(name)
    if not known:
        return path
    if not version:
        return HERE / name / known[-1]
    if version not in known:
        raise SonocadError(f"{run}: no such version of the shipped model {name}; known: "
                           f"{', '.join(f'{name}@{v}' for v in known)} ({name} names {name}@{known[-1]})")
    return HERE / name / version


def shipped_version(path: str | Path) -> str | None:
    """`model@version` of a shipped model's folder, or None for a model that was not shipped."""
    path = Path(path).resolve()
    if path.parent.parent == HERE and path.name in versions(path.parent.name):
        return f"{path.parent.name}@{path.name}"
    return None
