"""DICOM input: pixels as the scanner stored them, the ultrasound region, and no patient data in any output."""
import io
import json
import os

import numpy as np
import pydicom
import pytest
from conftest import BUSI, need, one_line_error
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from sonocad.cli.main import main
from sonocad.data.dicom import read_dicom, split_ref
from sonocad.data.images import load_gray
from sonocad.errors import SonocadError

PHI = {"PatientName": "DOE^JANE", "PatientID": "PID-SECRET-4711", "PatientBirthDate": "19700101",
       "InstitutionName": "SAINT NOWHERE HOSPITAL", "ReferringPhysicianName": "HOUSE^GREGORY",
       "AccessionNumber": "ACC-998877"}


def write_dicom(path, frames, *, region=None, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian,
                bits=8, preamble=True):
    """A DICOM file of one or more uint8 frames (H, W), or RGB frames (H, W, 3), with patient tags planted."""
    frames = [np.asarray(f) for f in frames]
    a = np.stack(frames)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    multi = len(frames) > 1
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = a.shape[1:3]
    rgb = a.ndim == 4
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if bits == 16:
        a = a.astype(np.uint16) * 257
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if multi:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = (a if multi else a[0]).tobytes()
    if region is not None:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType = 1, 1
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = region
        ds.SequenceOfUltrasoundRegions = [r]
    if syntax == JPEGBaseline8Bit:      # encoded with Pillow, encapsulated as a scanner would store it
        buf = io.BytesIO()
        Image.fromarray(a[0]).save(buf, "JPEG", quality=95)
        ds.PixelData = pydicom.encaps.encapsulate([buf.getvalue()])
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        if rgb:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds["PixelData"].VR = "OB"
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def with_burnt_in_text(img: np.ndarray, pad: int = 40) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`img` inside a larger frame with bright text and a ruler outside it, and the image's region."""
    h, w = img.shape
    canvas = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    canvas.paste(Image.fromarray(img), (pad, pad))
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), "DOE^JANE  L BREAST 10:00", fill=255)
    for y in range(pad, pad + h, 10):
        d.line([(w + pad + 5, y), (w + pad + 15, y)], fill=255)
    return np.asarray(canvas), (pad, pad, pad + w - 1, pad + h - 1)


def _img(seed=0, shape=(120, 160)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_pixels_photometric_and_depth(tmp_path):
    img = _img()
    assert np.array_equal(np.asarray(read_dicom(write_dicom(tmp_path / "m2.dcm", [img]))), img)
    inverted = read_dicom(write_dicom(tmp_path / "m1.dcm", [255 - img], photometric="MONOCHROME1"))
    assert np.array_equal(np.asarray(inverted), img)                     # MONOCHROME1: bright is low
    assert np.array_equal(np.asarray(read_dicom(write_dicom(tmp_path / "16.dcm", [img], bits=16))), img)
    rgb = np.stack([img] * 3, -1)
    assert np.abs(np.asarray(read_dicom(write_dicom(tmp_path / "rgb.dcm", [rgb]))).astype(int) - img).max() <= 1
    raw = write_dicom(tmp_path / "raw.dcm", [img], preamble=False)       # no 128-byte preamble, .dcm suffix
    assert np.array_equal(np.asarray(read_dicom(raw)), img)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compression(tmp_path, syntax):
    img = _img(1)
    assert np.array_equal(np.asarray(read_dicom(write_dicom(tmp_path / "c.dcm", [img], syntax=syntax))), img)


def test_jpeg_baseline_gray_and_ybr(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1))
    gray = np.asarray(read_dicom(write_dicom(tmp_path / "g.dcm", [smooth], syntax=JPEGBaseline8Bit)))
    ybr = np.asarray(read_dicom(write_dicom(tmp_path / "c.dcm", [np.stack([smooth] * 3, -1)], syntax=JPEGBaseline8Bit)))
    assert np.abs(gray.astype(int) - smooth).mean() < 2 and np.abs(ybr.astype(int) - smooth).mean() < 3


def test_ultrasound_region_keeps_text_and_rulers_out(tmp_path):
    img = _img(2)
    framed, region = with_burnt_in_text(img)
    out = np.asarray(load_gray(str(write_dicom(tmp_path / "r.dcm", [framed], region=region))))
    assert np.array_equal(out, img)
    without = np.asarray(load_gray(str(write_dicom(tmp_path / "n.dcm", [framed]))))
    assert without.shape == framed.shape                                  # no region: the whole frame


def test_multi_frame_chosen_or_every_frame(tmp_path):
    from sonocad.config import TrainConfig
    from sonocad.training.prepare import prepare_data

    frames = [np.full((64, 80), 20 * k, np.uint8) for k in range(5)]
    cine = write_dicom(tmp_path / "cine.dcm", frames)
    assert np.asarray(load_gray(str(cine))).mean() == 0                  # the first frame
    assert np.asarray(load_gray(f"{cine}#frame=3")).mean() == 60
    with pytest.raises(SonocadError, match="has 5 frame"):
        load_gray(f"{cine}#frame=9")
    assert split_ref(f"{cine}#frame=3") == (str(cine), 3)
    data = tmp_path / "d"
    for cls in ("benign", "malignant"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            write_dicom(data / cls / f"{cls}{i}.dcm", [_img(10 * i + k + (cls == "benign")) for k in range(3)])
    prepared = prepare_data(data, TrainConfig(img_size=48, frames="all", dedup=False))
    paths = [s.path for s in prepared.full.samples]
    assert len(paths) == 24 and all("#frame=" in p for p in paths)
    groups = {}
    for s, g in zip(prepared.full.samples, prepared.full.groups):
        groups.setdefault(split_ref(s.path)[0], set()).add(int(g))
    assert len(groups) == 8 and all(len(g) == 1 for g in groups.values())   # a file's frames: one group
    middle = prepare_data(data, TrainConfig(img_size=48, frames="middle", dedup=False))
    assert all(s.path.endswith("#frame=1") for s in middle.full.samples)


def test_a_frame_count_the_file_cannot_hold_is_refused(tmp_path):
    from sonocad.data.dicom import frame_refs

    loop = write_dicom(tmp_path / "loop.dcm", [_img(k, (40, 50)) for k in range(3)])
    assert len(frame_refs(str(loop), "all")) == 3
    ds = pydicom.dcmread(loop)
    ds.NumberOfFrames = 1_000_000                     # a few kilobytes claiming a million frames
    ds.save_as(tmp_path / "claims.dcm")
    with pytest.raises(SonocadError, match=r"claims.dcm: its header says 1000000 frames, more than its \d+ bytes"):
        frame_refs(str(tmp_path / "claims.dcm"), "all")


def test_bad_dicom_is_one_line(tmp_path, capsys):
    img = _img(3)
    good = write_dicom(tmp_path / "good.dcm", [img])
    (tmp_path / "trunc.dcm").write_bytes(good.read_bytes()[:3000])
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"        # MPEG-2: no decoder for it
    ds.PixelData = pydicom.encaps.encapsulate([img.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm")
    (tmp_path / "text.dcm").write_text("not dicom at all")
    for name, why in (("trunc.dcm", "truncated"), ("nopix.dcm", "no pixel data"), ("mpeg.dcm", "MPEG2"),
                      ("text.dcm", "DICOM")):
        with pytest.raises(SonocadError, match=why) as e:
            load_gray(str(tmp_path / name))
        assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / name))
        assert not any(v in str(e.value) for v in PHI.values())


def test_dicom_training_and_outputs_hold_no_patient_data(phantoms, tmp_path, capsys):
    """Train, evaluate, predict, dedup and the errors on DICOM copies of the phantoms (one damaged, skipped):
    no patient tag appears in any file written or any line printed."""
    data = tmp_path / "dcm"
    for png in phantoms.rglob("*).png"):
        (data / png.parent.name).mkdir(parents=True, exist_ok=True)
        framed, region = with_burnt_in_text(np.asarray(Image.open(png).convert("L")), pad=12)
        write_dicom(data / png.parent.name / f"{png.stem}.dcm", [framed], region=region)
    (data / "benign" / "broken.dcm").write_bytes((data / "benign" / "benign (1).dcm").read_bytes()[:2000])
    run, ev, csv_out, dd = tmp_path / "run", tmp_path / "eval", tmp_path / "p.csv", tmp_path / "dd"
    err = one_line_error(capsys, ["train", str(data), "--out", str(run), "--img-size", "48", "--quiet"])
    assert "broken.dcm" in err
    assert main(["train", str(data), "--out", str(run), "--img-size", "48", "--head-epochs", "2",
                 "--finetune-epochs", "1", "--skip-bad", "--quiet"]) == 0
    assert main(["evaluate", str(run), str(data), "--out", str(ev), "--skip-bad"]) == 0
    assert main(["predict", str(run), str(data / "malignant"), "--csv", str(csv_out)]) == 0
    assert main(["predict", str(run), str(data / "benign" / "benign (2).dcm")]) == 0
    (data / "benign" / "broken.dcm").unlink()
    assert main(["dedup", str(data), "--out", str(dd), "--quiet"]) == 0
    printed = capsys.readouterr()
    texts = [printed.out, printed.err]
    for root in (run, ev, dd):
        texts += [p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()
                  and p.suffix in (".json", ".csv", ".html")]
    texts.append(csv_out.read_text())
    for value in PHI.values():
        assert not any(value in t for t in texts), value
    assert "broken.dcm" in printed.err and json.loads((run / "metrics.json").read_text())["n"] > 0


def test_dicom_copy_of_a_busi_image_gets_the_png_probability(tiny_run, tmp_path):
    """A DICOM copy of a BUSI image, inside a larger frame with burnt-in text and its ultrasound region
    declared, is predicted as the PNG is (uncompressed: the same pixels; JPEG baseline: within 0.01)."""
    from sonocad.deploy.predictor import Predictor

    png = need(BUSI) / "benign" / "benign (12).png"
    framed, region = with_burnt_in_text(np.asarray(Image.open(png).convert("L")))
    plain = write_dicom(tmp_path / "exam.dcm", [framed], region=region)
    jpeg = write_dicom(tmp_path / "exam_jpeg.dcm", [np.stack([framed] * 3, -1)], region=region,
                       syntax=JPEGBaseline8Bit)
    p = Predictor.load(tiny_run).predict_proba([str(png), str(plain), str(jpeg)])[:, 1]
    assert p[1] == pytest.approx(p[0], abs=1e-6) and abs(p[2] - p[0]) < 0.01, p


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_pydicoms_sample_files_decode_as_their_uncompressed_original(name):
    """pydicom ships no ultrasound sample; its 16-bit signed MR sample in several transfer syntaxes (RLE,
    JPEG 2000 and JPEG-LS lossless, big endian, implicit VR) must give the pixels of the uncompressed file."""
    folder = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    reference = np.asarray(load_gray(os.path.join(folder, "MR_small.dcm")))
    assert np.array_equal(np.asarray(load_gray(os.path.join(folder, name))), reference)


def test_cine_loops_train_predict_and_keep_their_frames_together(tmp_path):
    """`--frames all` trains on every frame of multi-frame files (frames of one file in one group: in one part
    of every split, in one fold), and predict gives one row per frame of such a run."""
    import csv
    from collections import Counter

    from sonocad.config import TrainConfig
    from sonocad.dedup import DedupSettings
    from sonocad.training.datarecord import data_record
    from sonocad.training.prepare import dedup_cache_key, hold_out_test, prepare_data, split_train_val
    from sonocad.workflows.cv import fold_indices
    from sonocad.workflows.evaluate import predict_paths
    from sonocad.workflows.train import fit

    data = tmp_path / "d"
    for c, cls in enumerate(("benign", "malignant")):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            write_dicom(data / cls / f"{cls}{i}.dcm", [_img(30 * i + 3 * k + c, (40, 48)) // (1 + c) for k in range(3)])
    cfg = TrainConfig(img_size=32, frames="all", dedup=False, head_epochs=1, finetune_epochs=0, batch_size=8,
                      test_size=0.34, val_size=0.25)
    prepared = prepare_data(data, cfg)
    refs = [s.path for s in prepared.full.samples]
    dedup_cache_key(refs, DedupSettings())             # stats the files, not "file.dcm#frame=K"
    assert len(data_record(prepared.full.samples)["data"]) == 36
    rest, test = hold_out_test(prepared.full, cfg)
    parts = [{split_ref(s.path)[0] for s in part.samples} for part in (*split_train_val(rest, cfg), test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    folds = fold_indices(prepared.full.y, list(prepared.full.groups), prepared.sites, 3, 0)
    files = {split_ref(r)[0] for r in refs}
    assert all(len({f for r, f in zip(refs, folds) if split_ref(r)[0] == file}) == 1 for file in files)
    run = tmp_path / "run"
    fit(data, run, cfg, progress=False)
    with open(run / "predictions.csv", newline="") as f:
        per_file = Counter(split_ref(r["path"])[0] for r in csv.DictReader(f))
    assert per_file and set(per_file.values()) == {3}       # every frame of each test file, none elsewhere
    rows = predict_paths(run, [data / "benign" / "benign0.dcm"])
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["frame=0", "frame=1", "frame=2"]
