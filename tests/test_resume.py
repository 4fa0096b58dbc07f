"""Faults: a run killed with SIGKILL resumes from its last checkpoint and ends with the same numbers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["--img-size", "48", "--head-epochs", "4", "--finetune-epochs", "3", "--batch-size", "8",
        "--patience", "10", "--seed", "1", "--quiet"]


def _train(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "sonocad", "train", str(data), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    m.pop("timing_seconds")
    return m


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_metrics(phantoms, tmp_path):
    full = tmp_path / "full"
    p = _train(phantoms, full, "--out", str(full), *ARGS)
    assert p.wait(timeout=300) == 0, p.stderr.read()

    killed = tmp_path / "killed"
    p = _train(phantoms, killed, "--out", str(killed), *ARGS)
    log = killed / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:   # two epochs done
            break
        time.sleep(0.05)
    assert p.poll() is None, "training finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "metrics.json").exists()

    r = _train(phantoms, killed, "--resume", str(killed))
    assert r.wait(timeout=300) == 0, r.stderr.read()
    assert _metrics(killed) == _metrics(full)
    assert (killed / "log.csv").read_text().count("\n") == (full / "log.csv").read_text().count("\n")
    assert (killed / "predictions.csv").read_text() == (full / "predictions.csv").read_text()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from sonocad.cli import main

    (tmp_path / "run").mkdir()
    assert main(["train", str(tmp_path), "--resume", str(tmp_path / "run")]) == 2
    assert "no checkpoint there to resume from" in capsys.readouterr().err


def test_damaged_checkpoint_is_a_clear_error(tiny_run, phantoms, tmp_path, capsys):
    import shutil

    from sonocad.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", str(phantoms), "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "last.pt: damaged or unsafe checkpoint" in err and len(err.strip().splitlines()) == 1
