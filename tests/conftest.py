"""Shared fixtures: tiny synthetic datasets, the shared real data (skipped with a reason when absent)."""
import os
import tempfile
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and in the processes they start), or OpenMP's
    # waiting threads fight over the cores and every test slows down several times
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import pytest

# keep the tests' dedup cache out of the user's ~/.cache
os.environ.setdefault("SONOCAD_CACHE", tempfile.mkdtemp(prefix="sonocad-test-cache-"))

from sonocad.data.synth import write_phantom_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUSI = SHARED / "busi" / "Dataset_BUSI_with_GT"
BUSBRA = SHARED / "busbra" / "BUSBRA"


def one_line_error(capsys, argv) -> str:
    """Run the CLI with `argv`: it must fail with exit code 2 and one line on stderr, which is returned."""
    from sonocad.cli.main import main

    capsys.readouterr()                          # what earlier commands printed is not this one's
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """48 synthetic B-mode phantoms of 64 px in the BUSI class-folder layout."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(out, n=48, seed=3, size=64)
    return out


@pytest.fixture(scope="session")
def tiny_run(phantoms, tmp_path_factory) -> Path:
    """A tiny trained run (64 px, a couple of epochs) shared by evaluate/predict tests."""
    from sonocad.cli.main import main

    run = tmp_path_factory.mktemp("run") / "tiny"
    rc = main(["train", str(phantoms), "--out", str(run), "--img-size", "64", "--head-epochs", "3",
               "--finetune-epochs", "1", "--batch-size", "8", "--seed", "0", "--quiet"])
    assert rc == 0
    return run
