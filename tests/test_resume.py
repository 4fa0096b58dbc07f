"""Faults: a run killed with SIGKILL resumes from its last checkpoint and ends with the same numbers.

Only the runs that are killed are separate processes (conftest.Sonocad); the uninterrupted runs and the resumes
run in the test's own process (the same threads, so the same numbers)."""
import json
import signal
import time

import pytest
from conftest import Sonocad

ARGS = ["--img-size", "48", "--head-epochs", "4", "--finetune-epochs", "3", "--batch-size", "8", "--no-dedup",
        "--patience", "10", "--seed", "1", "--quiet"]


def _metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    m.pop("timing_seconds")
    return m


def _train_here(data, *extra):
    from sonocad.cli.main import main

    assert main(["train", str(data), *extra]) == 0


@pytest.fixture(scope="module")
def full_run(phantoms, tmp_path_factory):
    full = tmp_path_factory.mktemp("full") / "run"
    _train_here(phantoms, "--out", str(full), *ARGS)
    return full


def _interrupt(phantoms, run, sig, epochs_done, args=ARGS):
    p = Sonocad(["train", phantoms, "--out", run, *args])
    log = run / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= epochs_done + 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, "training finished before it could be interrupted"
    p.send_signal(sig)
    p.wait(timeout=120)
    assert not (run / "metrics.json").exists()
    return p


def _resume_and_compare(phantoms, run, full):
    _train_here(phantoms, "--resume", str(run))
    assert _metrics(run) == _metrics(full)
    assert (run / "log.csv").read_text().count("\n") == (full / "log.csv").read_text().count("\n")
    assert (run / "predictions.csv").read_text() == (full / "predictions.csv").read_text()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_metrics(phantoms, full_run, tmp_path):
    run = tmp_path / "killed"
    _interrupt(phantoms, run, signal.SIGKILL, epochs_done=2)      # in phase 1
    _resume_and_compare(phantoms, run, full_run)


@pytest.mark.slow
def test_sigint_stops_cleanly_and_resumes(phantoms, full_run, tmp_path):
    run = tmp_path / "interrupted"
    p = _interrupt(phantoms, run, signal.SIGINT, epochs_done=5)    # in phase 2
    err = p.stderr.read().strip()
    assert p.returncode == 130 and len(err.splitlines()) == 1 and "--resume" in err, err
    _resume_and_compare(phantoms, run, full_run)


@pytest.mark.slow
def test_killed_init_run_resumes_and_averages_once(phantoms, tiny_run, tmp_path):
    # a fine-tuning from --init ends by averaging with the init's weights (--keep-init 0.5); killed mid phase 2
    # and resumed, it must average exactly once, from the init's own weights: the uninterrupted run's weights
    args = ["--init", str(tiny_run), "--img-size", "48", "--head-epochs", "2", "--finetune-epochs", "4", "--no-dedup",
            "--batch-size", "8", "--patience", "10", "--seed", "1", "--quiet"]
    full, run = tmp_path / "full", tmp_path / "killed"
    _train_here(phantoms, "--out", str(full), *args)
    _interrupt(phantoms, run, signal.SIGKILL, epochs_done=3, args=args)
    _train_here(phantoms, "--resume", str(run))
    assert (run / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert _metrics(run) == _metrics(full)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from sonocad.cli.main import main

    (tmp_path / "run").mkdir()
    assert main(["train", str(tmp_path), "--resume", str(tmp_path / "run")]) == 2
    assert "no checkpoint there to resume from" in capsys.readouterr().err


def test_damaged_checkpoint_is_a_clear_error(tiny_run, phantoms, tmp_path, capsys):
    import shutil

    from sonocad.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("run.json", "metrics.json"):      # an interrupted run, not a finished one
        (run / name).unlink()
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", str(phantoms), "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "last.pt: damaged or unsafe checkpoint" in err and len(err.strip().splitlines()) == 1
