"""A careless or hostile user: finished runs are never lost or mixed, every bad input is one line."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Sonocad
from conftest import one_line_error as _err
from PIL import Image

from sonocad.cli.main import main
from sonocad.errors import SonocadError

TINY = ["--img-size", "48", "--head-epochs", "2", "--finetune-epochs", "1", "--batch-size", "8", "--no-dedup",
        "--quiet"]



def _copy_run(run, dst):
    import shutil

    shutil.copytree(run, dst)
    return dst


def _consistent(run: Path) -> dict:
    """A finished run whose stored model gives its own predictions.csv; returns its config."""
    import csv

    from sonocad.deploy.predictor import Predictor
    from sonocad.io.rundir import check_finished

    check_finished(run)
    p = Predictor.load(run)
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    probs = p.predict_proba([r["path"] for r in rows])[:, 1]
    assert np.allclose(probs, [float(r["prob"]) for r in rows], atol=2e-6)
    return json.loads((run / "config.json").read_text())["config"]


# --- 1-3: finished runs are never replaced, mixed or written twice at once --------------------------------

def test_finished_run_is_kept_unless_overwrite(tiny_run, phantoms, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    before = (run / "model.safetensors").read_bytes()
    err = _err(capsys, ["train", str(phantoms), "--out", str(run), *TINY])
    assert "holds a finished train result" in err and "--overwrite" in err
    err = _err(capsys, ["evaluate", str(run), str(phantoms), "--out", str(run)])
    assert "which this command reads" in err
    err = _err(capsys, ["predict", str(run), str(phantoms / "benign"), "--csv", str(run / "model.safetensors")])
    assert "which this command reads" in err
    err = _err(capsys, ["evaluate", str(tiny_run), str(phantoms), "--out", str(run / "eval")])
    assert "a sonocad result folder" in err
    assert (run / "model.safetensors").read_bytes() == before
    assert main(["train", str(phantoms), "--out", str(run), "--overwrite", *TINY, "--seed", "3"]) == 0
    assert _consistent(run)["seed"] == 3
    assert not list(tmp_path.glob(".run.new-*")) and not list(tmp_path.glob(".run.old-*"))


def test_evaluation_folder_is_replaced_whole(tiny_run, phantoms, tmp_path, capsys):
    from sonocad.io.rundir import check_finished, kind

    out = tmp_path / "e"
    assert main(["evaluate", str(tiny_run), str(phantoms), "--out", str(out)]) == 0
    (out / "plots" / "stale.png").write_text("from an earlier evaluation")
    (out / "notes.txt").write_text("the user's")
    benign = tmp_path / "benign.csv"
    benign.write_text("path,label\n" + "".join(f"{p},benign\n" for p in (phantoms / "benign").glob("*).png")))
    argv = ["evaluate", str(tiny_run), str(benign), "--out", str(out)]
    assert "also holds what sonocad did not write there (e.g. notes.txt)" in _err(capsys, argv)   # never deleted
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    assert main(argv) == 0
    assert "sonocad: warning: " in capsys.readouterr().err
    assert kind(out) == "evaluate" and not (out / "plots" / "stale.png").exists()
    check_finished(out)
    assert json.loads((out / "metrics.json").read_text())["n_per_class"]["malignant"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".e.")] == []      # no scratch, no lock left
    import shutil

    run = tmp_path / "run"                        # a run to be replaced with --overwrite, likewise
    shutil.copytree(tiny_run, run)
    (run / "notes").mkdir()
    err = _err(capsys, ["train", str(phantoms), "--out", str(run), "--overwrite", *TINY])
    assert "also holds what sonocad did not write there (e.g. notes)" in err and (run / "notes").is_dir()


def test_unfinished_or_foreign_folders_are_refused(phantoms, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    err = _err(capsys, ["train", str(phantoms), "--out", str(tmp_path / "mine"), "--overwrite", *TINY])
    assert "holds no sonocad result" in err
    err = _err(capsys, ["evaluate", str(tmp_path), str(phantoms), "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_changed_run_files_are_refused(tiny_run, phantoms, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["img_size"] = 96                     # a half-overwritten run: new preprocessing, old model
    (run / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["evaluate", str(run), str(phantoms), "--out", str(tmp_path / "e")])
    assert "config.json changed after the run finished" in err


def _train(*args):
    return Sonocad(["train", *args])


def _wait_for(p, cond, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_during_overwrite_leaves_old_or_new_run(tiny_run, phantoms, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    old_seed = _consistent(run)["seed"]
    scratch = lambda name: any(p.is_dir() and (p / name).exists() for p in tmp_path.glob(".run.new-*"))  # noqa: E731
    # (a kill before the scratch folder exists touches nothing; the points below each leave a half-written one)
    points = {"config written": lambda: scratch("config.json"),
              "phase 2": lambda: scratch("log.csv") and "finetune" in next(tmp_path.glob(".run.new-*/log.csv")).read_text(),
              "finished, before the swap": lambda: scratch("run.json")}
    seen = set()
    for name, cond in points.items():
        p = _train(phantoms, "--out", run, "--overwrite", *TINY, "--seed", "9")
        _wait_for(p, cond)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        seen.add(_consistent(run)["seed"])          # whole, whichever it is
    assert seen <= {old_seed, 9}
    assert main(["train", str(phantoms), "--out", str(run), "--overwrite", *TINY, "--seed", "9"]) == 0
    assert _consistent(run)["seed"] == 9 and not list(tmp_path.glob(".run.new-*"))


@pytest.mark.slow
def test_second_writer_is_refused(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    first = _train(phantoms, "--out", run, *TINY, "--head-epochs", "3000", "--patience", "3000")
    assert _wait_for(first, lambda: (run / "log.csv").exists())
    err = _err(capsys, ["train", str(phantoms), "--out", str(run), *TINY])    # this process: the second writer
    assert "another sonocad process is writing it" in err and f"pid {first.pid}" in err, err
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # the dead writer's lock is free again: its unfinished run can be replaced
    assert main(["train", str(phantoms), "--out", str(run), "--overwrite", *TINY]) == 0
    _consistent(run)


def test_lock_is_per_folder_whatever_its_name(tmp_path, monkeypatch):
    from sonocad.io.rundir import RunLock

    real = tmp_path / "runs" / "real"
    real.mkdir(parents=True)
    (tmp_path / "runs" / "latest").symlink_to(real)
    monkeypatch.chdir(real)
    with RunLock(real) as lock:
        assert lock.run == real.resolve()
        for other in (tmp_path / "runs" / "latest", ".", f"{real}/"):     # one folder, one lock
            with pytest.raises(SonocadError, match="another sonocad process is writing it"):
                RunLock(other).__enter__()


def test_leftovers_are_matched_exactly(tmp_path):
    from sonocad.io.rundir import RunLock

    busy = tmp_path / ".exp1.new-123"            # another run's scratch folder
    busy.mkdir()
    backup = tmp_path / ".busi.old-backup"       # a user's folder that only looks like a leftover
    backup.mkdir()
    with RunLock(tmp_path / "exp[1]"), RunLock(tmp_path / "busi"):
        pass
    assert busy.is_dir() and backup.is_dir()
    (tmp_path / ".exp1.new-456").mkdir()         # a leftover of exp1's own: removed by its next writer
    with RunLock(tmp_path / "exp1"):
        pass
    assert not (tmp_path / ".exp1.new-456").exists() and not busy.exists()


def test_damaged_run_record_and_unfinished_cv(tiny_run, phantoms, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "run.json").write_text('{"files": []}')
    assert "run.json: damaged record of a finished run" in _err(capsys, ["predict", str(run), str(phantoms)])
    cv = tmp_path / "cv"
    _copy_run(tiny_run, cv / "fold-1")           # a cross-validation killed after its first fold
    assert "cross-validation in progress or interrupted" in _err(capsys, ["predict", str(cv), str(phantoms)])
    assert "--overwrite are train options" in _err(capsys, ["cv", str(phantoms), "--out", str(cv), "--overwrite"])


# --- 4: resume checks the data and the settings ------------------------------------------------------------

@pytest.fixture
def interrupted(phantoms, tmp_path):
    """An interrupted run on a manifest of the phantoms (its checkpoint after phase 1's first epochs)."""
    rows = sorted(p for p in phantoms.rglob("*).png"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in rows))
    run = tmp_path / "run"
    p = _train(manifest, "--out", run, *TINY, "--head-epochs", "12", "--patience", "12")
    assert _wait_for(p, lambda: (run / "log.csv").exists() and len((run / "log.csv").read_text().splitlines()) > 2)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    return manifest, run, rows


@pytest.mark.slow
def test_resume_refuses_other_data_or_settings(interrupted, capsys):
    manifest, run, rows = interrupted
    swapped = manifest.parent / "swapped.csv"         # the same files, labels exchanged
    swapped.write_text("path,label\n" + "".join(
        f"{p},{'malignant' if p.parent.name == 'benign' else 'benign'}\n" for p in rows))
    err = _err(capsys, ["train", str(swapped), "--resume", str(run)])
    assert "data differ" in err and "data: 48 image(s) with another label, group or site" in err
    lines = manifest.read_text().splitlines()
    reordered = manifest.parent / "reordered.csv"      # the same rows in another order: other splits
    reordered.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert "the same images in another order" in _err(capsys, ["train", str(reordered), "--resume", str(run)])
    fewer = manifest.parent / "fewer.csv"
    fewer.write_text("\n".join(manifest.read_text().splitlines()[:-3]) + "\n")
    assert "data: 3 image(s) missing" in _err(capsys, ["train", str(fewer), "--resume", str(run)])
    err = _err(capsys, ["train", str(manifest), "--resume", str(run), "--img-size", "96", "--seed", "3"])
    assert "img_size (--img-size) 96, the run's 48" in err and "seed (--seed) 3, the run's 0" in err
    assert main(["train", str(manifest), "--resume", str(run), "--img-size", "48", "--quiet"]) == 0   # the same
    capsys.readouterr()          # its output (a warning about the tiny validation part) is not the next error
    _consistent(run)
    assert "finished; there is nothing to resume" in _err(capsys, ["train", str(manifest), "--resume", str(run),
                                                                   "--quiet"])


def test_resume_judges_files_by_their_content(phantoms, tmp_path):
    """Files whose modification times alone changed (a copy with new times, a checkout) are the same data; a
    file whose bytes changed at the same size is not; a record written before SHA-256 was kept falls back to the
    times."""
    import shutil

    from sonocad.data import discover
    from sonocad.training.datarecord import check_same_data, data_record, write_data_record

    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    record = tmp_path / "data.json"
    write_data_record(record, data_record(discover(data, ["benign", "malignant"])))
    first = next(data.glob("benign/*).png"))
    later = time.time() + 100
    for p in data.rglob("*.png"):
        os.utime(p, (later, later))
    check_same_data(record, data_record(discover(data, ["benign", "malignant"])))     # no refusal
    raw = bytearray(first.read_bytes())
    raw[-20] ^= 0xFF                                  # same size, other bytes
    first.write_bytes(bytes(raw))
    with pytest.raises(SonocadError, match=r"data: 1 image\(s\) changed on disk \(e.g. .*benign"):
        check_same_data(record, data_record(discover(data, ["benign", "malignant"])))
    old = json.loads(record.read_text())
    del old["sha256"]
    record.write_text(json.dumps(old))
    with pytest.raises(SonocadError, match=r"data: 48 image\(s\) changed on disk"):
        check_same_data(record, data_record(discover(data, ["benign", "malignant"])))


def test_damaged_feature_cache_on_resume(interrupted, capsys):
    manifest, run, _ = interrupted
    (run / "checkpoints" / "features.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    err = _err(capsys, ["train", str(manifest), "--resume", str(run)])
    assert "features.pt: damaged or unsafe feature cache" in err


# --- 5-7: wrong results without an error --------------------------------------------------------------------

def test_diverging_training_stops_in_one_line(phantoms, tmp_path, capsys):
    err = _err(capsys, ["train", str(phantoms), "--out", str(tmp_path / "r"), *TINY, "--unfreeze", "0",
                        "--optimizer", "sgd", "--head-lr", "1e6"])
    assert "training diverged in the head phase" in err and "--head-lr" in err


def test_batch_size_one_trains(phantoms, tmp_path):
    import csv

    run = tmp_path / "r"
    assert main(["train", str(phantoms), "--out", str(run), "--img-size", "48", "--head-epochs", "2",
                 "--unfreeze", "0", "--batch-size", "1", "--no-dedup", "--quiet"]) == 0
    with open(run / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses and all(np.isfinite(losses))


def test_manifest_with_an_image_twice(phantoms, tmp_path, capsys):
    img = next(phantoms.glob("benign/*).png"))
    (tmp_path / "m.csv").write_text(f"path,label\n{img},benign\n{img},malignant\n")
    assert "listed as benign and as malignant (rows 2 and 3)" in _err(
        capsys, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "r")])
    (tmp_path / "m.csv").write_text(f"path,label\n{img},benign\n{img},benign\n")
    assert "listed twice" in _err(capsys, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "r")])


def test_labels_left_out_and_one_class_data_are_said(tiny_run, phantoms, tmp_path, capsys):
    from sonocad.data import discover

    rows = [f"{p},{'Malignant' if p.parent.name == 'malignant' else p.parent.name}" for p in phantoms.rglob("*).png")]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"left out 24 image\(s\).*Malignant \(24\).*meant to be 'malignant'"):
        discover(tmp_path / "m.csv", ["benign", "malignant"], allow_missing_classes=True)
    assert main(["evaluate", str(tiny_run), str(tmp_path / "m.csv"), "--out", str(tmp_path / "e")]) == 0
    out, err = capsys.readouterr()
    assert "no images of malignant" in err and "AUC n/a" in out and " nan" not in out


# --- 8-11: tracebacks and hangs become one line -------------------------------------------------------------

def test_file_names_that_are_not_utf8(phantoms, tmp_path, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(phantoms, data)
    odd = os.fsdecode(b"benign \xff\xfe.png")
    os.rename(data / "benign" / "benign (1).png", data / "benign" / odd)
    os.rename(data / "benign" / "benign (1)_mask.png", data / "benign" / os.fsdecode(b"benign \xff\xfe_mask.png"))
    run = tmp_path / "r"
    assert main(["train", str(phantoms), "--test", str(data), "--out", str(run), "--img-size", "48", "--head-epochs",
                 "1", "--unfreeze", "0", "--no-dedup", "--quiet"]) == 0
    assert (run / "report.html").is_file() and b"benign \xff\xfe.png" in (run / "predictions.csv").read_bytes()
    assert main(["predict", str(run), str(data / "benign"), "--csv", str(tmp_path / "p.csv")]) == 0
    assert b"benign \xff\xfe.png" in (tmp_path / "p.csv").read_bytes()
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "benign" / odd)]) == 0
    assert "benign \\udcff\\udcfe.png" in capsys.readouterr().out     # escaped on the terminal


@pytest.mark.parametrize("argv,match", [
    (["--seed", "-1"], "--seed: must be between 0 and 4294967295"),
    (["--seed", str(2**64)], "--seed: must be between 0"),
    (["--head-lr", "inf"], "--head-lr: must be a positive number, not inf"),
    (["--finetune-lr", "nan"], "--finetune-lr: must be a positive number, not nan"),
    (["--img-size", "100000"], "--img-size: must be between 32 and 1024 px, not 100000"),
])
def test_impossible_option_values(phantoms, tmp_path, capsys, argv, match):
    assert match in _err(capsys, ["train", str(phantoms), "--out", str(tmp_path / "r"), *argv])
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("field,value,match", [
    ("img_size", "abc", "img_size: 'abc' is not of type int"),
    ("img_size", 60000, "img_size: must be between 32 and 1024 px"),
    ("seed", 1.5, "seed: 1.5 is not of type int"),
    ("tta_zooms", [5], "tta_zooms: each zoom must be between 0.5 and 2"),
    ("resize", "crop", "resize: must be pad or stretch"),
])
def test_impossible_config_json(tiny_run, tmp_path, capsys, field, value, match):
    run = _copy_run(tiny_run, tmp_path / "run")
    for name in ("run.json", "checkpoints/data.json"):  # a run from before finished runs were recorded
        (run / name).unlink()
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"][field] = value
    (run / "config.json").write_text(json.dumps(cfg))
    assert match in _err(capsys, ["predict", str(run), str(tmp_path)])


def test_other_commands_bad_input(tiny_run, phantoms, tmp_path, capsys):
    assert "--csv: " in _err(capsys, ["predict", str(tiny_run), str(phantoms / "benign"), "--csv", str(tmp_path)])
    bad = tmp_path / "bad"
    for cls in ("benign", "malignant"):
        (bad / cls).mkdir(parents=True)
        (bad / cls / "x.png").write_bytes(b"not an image")
    assert "none of the 2 images could be read" in _err(
        capsys, ["evaluate", str(tiny_run), str(bad), "--out", str(tmp_path / "e"), "--skip-bad"])
    assert "--unfreeze: must be a number of blocks or 'all'" in _err(capsys, ["summary", "--unfreeze", "abc"])


def test_named_pipe_is_refused_not_waited_on(tiny_run, tmp_path):
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "sonocad", "predict", str(tiny_run), str(fifo)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "scan.png: not a regular file" in r.stderr


def test_a_pipe_or_device_in_a_run_is_refused_not_waited_on(tiny_run, phantoms, tmp_path, capsys):
    import shutil

    def timeout(*_):
        raise TimeoutError("waited on a file of the run")

    image = str(next(phantoms.glob("benign/*).png")))
    previous = signal.signal(signal.SIGALRM, timeout)
    try:
        for name, make, message in (("model.safetensors", os.mkfifo, "model.safetensors: not a regular file"),
                                    ("model.safetensors", lambda p: os.symlink("/dev/zero", p),
                                     "model.safetensors: not a regular file"),
                                    ("run.json", os.mkfifo, "run.json: damaged record of a finished run")):
            run = tmp_path / f"run-{name}-{make.__name__}"
            shutil.copytree(tiny_run, run)
            (run / name).unlink()
            make(run / name)
            signal.alarm(60)
            assert message in _err(capsys, ["predict", str(run), image])
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 12: clear messages, readable files ---------------------------------------------------------------------

def test_interrupt_before_any_checkpoint_does_not_promise_resume(phantoms, tmp_path):
    p = _train(phantoms, "--out", tmp_path / "r", *TINY[:-2], "--quiet")     # with the duplicate search: a slow
    # start; quiet, so that what it prints is the interrupt's line alone, whichever step the signal lands in
    assert _wait_for(p, lambda: (tmp_path / ".r.lock").exists())    # the run has started
    time.sleep(0.3)                          # well inside it (one of three runs beside other tests died silently)
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    assert p.stderr.read().strip() == "sonocad: interrupted"


def test_bad_image_count_and_lab_tiff(tmp_path):
    from sonocad.data.images import load_gray, load_many

    paths = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
        paths.append(str(tmp_path / f"{i}.png"))
    with pytest.raises(SonocadError, match=r"and 4 more bad image\(s\) among the 5 read"):
        load_many(paths, 32)
    lab = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8)).convert("RGB").convert("LAB")
    lab.save(tmp_path / "lab.tif")
    gray = load_gray(str(tmp_path / "lab.tif"))
    assert gray.mode == "L" and gray.size == (50, 40)


def test_output_files_follow_the_umask(tmp_path):
    from sonocad.io.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
