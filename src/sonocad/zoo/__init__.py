"""Models shipped with sonocad: finished run directories inside the package, used by name wherever a run is
expected (`sonocad predict bus-base scan.png`, `sonocad train DATA --init bus-base`). A path that exists
always wins over a shipped name."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped models' names."""
    return sorted(p.name for p in HERE.iterdir() if (p / "config.json").is_file())


def resolve(run: str | Path) -> Path:
    """`run` as a path: a shipped model's folder when `run` is its name and no such path exists."""
    path = Path(run)
    if not path.exists() and str(run) in names():
        return HERE / str(run)
    return path


def shipped_version(path: str | Path) -> str | None:
    """The shipped model a path is (its folder's name), or None for a model that was not shipped."""
    path = Path(path).resolve()
    return path.name if path.parent == HERE and (path / "config.json").is_file() else None
