"""Optional parts (extras): a command whose part is missing stops before any work with one line that names the
missing packages and the install command; pyproject.toml declares what sonocad.runtime.extras checks."""
import sys
import tomllib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error

from sonocad.errors import MissingExtra
from sonocad.runtime.extras import EXTRAS, missing

ROOT = Path(__file__).resolve().parents[1]


def hide(monkeypatch, *modules: str) -> None:
    """Make `modules` look uninstalled for this test: import fails and find_spec finds nothing."""
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def says_install(message: str, extra: str) -> bool:
    return f"pip install 'sonocad[{extra}]'" in message and f"pip install -e '.[{extra}]'" in message


def test_project_dependencies_are_ranges_and_extras_match_the_checks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "==" in d]
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        declared = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in extras[extra]}
        assert set(modules.values()) <= declared, (extra, declared)
    assert extras["all"] == [f"sonocad[{','.join(EXTRAS)}]"]
    assert "sonocad[all]" in extras["test"]


def test_missing_names_only_the_absent_distributions(monkeypatch):
    assert missing("serve") == []
    hide(monkeypatch, "uvicorn")
    assert missing("serve") == ["uvicorn"]


def test_serve_without_its_extra_is_one_line(monkeypatch, capsys):
    hide(monkeypatch, "fastapi")
    monkeypatch.delitem(sys.modules, "sonocad.serve.app", raising=False)   # imported again: fastapi fails, a traceback
    err = one_line_error(capsys, ["serve", "no-such-run"])
    assert "sonocad serve needs fastapi" in err and says_install(err, "serve"), err


def test_export_without_onnx_is_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    hide(monkeypatch, "onnx")
    err = one_line_error(capsys, ["export", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "m.onnx")])
    assert "needs onnx" in err and says_install(err, "onnx"), err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv", [["predict", "model.onnx", "scan.png"],
                                  ["predict", "run", "scan.png", "--engine", "onnx"],
                                  ["evaluate", "model.onnx", "data", "--out", "eval"]])
def test_onnx_engine_without_onnxruntime_is_one_line(monkeypatch, capsys, tmp_path, argv):
    hide(monkeypatch, "onnxruntime")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, argv)
    assert "the onnx engine needs onnxruntime" in err and says_install(err, "onnx"), err
    assert list(tmp_path.iterdir()) == []


def test_dicom_without_pydicom_stops_at_the_first_dicom_file(monkeypatch, capsys, tmp_path, tiny_run, phantoms):
    from test_dicom import write_dicom

    png = next(phantoms.rglob("*.png"))
    scan = write_dicom(tmp_path / "exam.dcm", [np.full((64, 64), 90, np.uint8)])
    hide(monkeypatch, "pydicom")
    for skip_bad in ([], ["--skip-bad"]):           # not a bad image to skip: every DICOM file would fail alike
        err = one_line_error(capsys, ["predict", str(tiny_run), str(png), str(scan), *skip_bad])
        assert f"{scan}: reading a DICOM file needs pydicom" in err and says_install(err, "dicom"), err


def test_dicom_without_pydicom_raises_through_load_many(monkeypatch, tmp_path):
    from test_dicom import write_dicom

    from sonocad.data.images import load_many

    scan = write_dicom(tmp_path / "exam.dcm", [np.full((64, 64), 90, np.uint8)])
    hide(monkeypatch, "pydicom")
    with pytest.raises(MissingExtra, match="sonocad\\[dicom\\]"):
        load_many([str(scan)], 64, skip_bad=True)


def _indexed_from_two(monkeypatch):
    """The duplicate search's index from 2 images on (instead of 10,000), and faiss absent."""
    import sonocad.dedup
    from sonocad.dedup import DedupSettings

    monkeypatch.setattr(sonocad.dedup, "DedupSettings", partial(DedupSettings, exact_below=2))
    monkeypatch.setattr(DedupSettings, "for_method", classmethod(
        lambda cls, method="combined", threshold=None: cls(method=method, exact_below=2)))
    hide(monkeypatch, "faiss")


def test_large_duplicate_search_without_faiss_stops_before_any_work(monkeypatch, capsys, phantoms):
    import sonocad.dedup.group

    def no_work(*a, **k):
        raise AssertionError("features computed before the check")

    _indexed_from_two(monkeypatch)
    monkeypatch.setattr(sonocad.dedup.group, "compute_features", no_work)
    err = one_line_error(capsys, ["dedup", str(phantoms)])
    assert "needs faiss-cpu" in err and says_install(err, "faiss"), err


def test_training_without_faiss_names_no_dedup(monkeypatch, capsys, phantoms, tmp_path):
    _indexed_from_two(monkeypatch)
    err = one_line_error(capsys, ["train", str(phantoms), "--out", str(tmp_path / "run"), "--img-size", "64"])
    assert "--no-dedup" in err and says_install(err, "faiss"), err


def test_phash_search_needs_no_faiss(monkeypatch, phantoms):
    from sonocad.dedup import DedupSettings, find_duplicates

    hide(monkeypatch, "faiss")
    paths = [str(p) for p in sorted(phantoms.rglob("*.png"))[:6]]
    res = find_duplicates(paths, settings=DedupSettings(method="phash", exact_below=2))
    assert len(res.group) == len(paths)
