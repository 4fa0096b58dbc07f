"""`sonocad export`: a run's model as one ONNX file that carries its preprocessing contract, and the ONNX
Runtime engine that runs such a file the way sonocad runs the PyTorch model.

The graph takes the normalised input (N, 3, S, S) and gives the logits; the metadata (`sonocad_run`) holds the
run's config.json: input size, mean and std, resize mode, overlay cleaning, test-time views, classes, positive
class, operating points and temperature. `--int8` quantises it statically (QDQ, per channel, calibrated on
training images; never dynamically, which breaks depthwise CNNs).

>>> export_onnx("runs/busi", "busi.onnx")                      # doctest: +SKIP
>>> Predictor.load("busi.onnx").predict_proba(["scan.png"])    # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import OptionError, SonocadError
from ..io.files import atomic_path, refuse_replacing
from ..io.rundir import refuse_writing_into_runs
from ..models.classifier import probabilities
from ..runtime.extras import require
from ..zoo import resolve
from .predictor import Predictor

METADATA_KEY = "sonocad_run"


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def _written_by_export(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:      # not an ONNX file at all (protobuf raises its own errors)
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def export_onnx(run: str | Path, out: str | Path, int8: bool = False, calibration=None,
                n_calibration: int = 64) -> dict:
    """Write the run's model to `out` (one .onnx file, batch dimension dynamic); with `int8`, statically
    quantised, calibrated on `n_calibration` images of `calibration` (default: the run's training data)."""
    require("onnx", "ONNX export")
    import onnx
    out = Path(out)
    if out.suffix != ".onnx":
        raise OptionError("out", f"{out}: give a file name ending in .onnx")
    refuse_writing_into_runs(out, [resolve(run), calibration], "out")
    refuse_replacing(out, "out", _written_by_export, "an ONNX file written by sonocad export")
    predictor = Predictor.load(run, precision="fp32")
    if len(predictor.members) != 1:
        raise SonocadError(f"{run}: an ensemble of {len(predictor.members)} fold models; export one run (a fold)")
    model, pipeline = predictor.members[0]
    size = predictor.info.img_size
    example = pipeline(np.zeros((2, size, size), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Logits(model).eval(), (example,), dynamo=True, verbose=False,
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                    input_names=["image"], output_names=["logits"])
    proto = program.model_proto
    info = dataclasses.asdict(predictor.info)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(info), "sonocad_precision": "int8" if int8 else "fp32",
                                        "producer_note": "sonocad research tool, not a diagnostic device"})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        if int8:
            _quantize(tmp, predictor, calibration, n_calibration)
    return {"path": str(out), "bytes": out.stat().st_size, "int8": int8, "input_size": size}


def _quantize(path: Path, predictor: Predictor, calibration, n: int) -> None:
    """Static QDQ int8, per channel, calibrated on decoded training images (the run's preprocessing)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..data import discover

    source = calibration or predictor.info.data.get("source")
    if not source:
        raise OptionError("calibration", "the run does not record its training data; give --calibration DATA")
    try:
        samples = discover(source, predictor.classes, allow_missing_classes=True)
    except SonocadError as e:
        if calibration:
            raise
        raise OptionError("calibration", f"the run's training data cannot be read from here ({e}); give "
                          "--calibration DATA") from None
    rng = np.random.default_rng(0)
    picked = [samples[i].path for i in sorted(rng.choice(len(samples), min(n, len(samples)), replace=False))]
    images = predictor.decode(picked, skip_bad=True)[0]
    pipeline = predictor.members[0][1]
    batches = [{"image": pipeline(images[i:i + 8]).cpu().numpy()} for i in range(0, len(images), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    fp32 = path.with_name(path.name + ".fp32")
    path.rename(fp32)
    logging.disable(logging.WARNING)      # onnxruntime's advice to pre-process, printed on every call
    try:
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)
        fp32.unlink(missing_ok=True)
    q = onnx.load(str(path))
    onnx.helper.set_model_props(q, props)
    onnx.save_model(q, str(path), save_as_external_data=False)


class OnnxModel(nn.Module):
    """An exported model run by ONNX Runtime, with the interface sonocad's predictor uses (forward gives logits,
    probabilities applies the temperature)."""

    bn_folded = True     # nothing for fold_batchnorm to do

    def __init__(self, path: Path, classes: list[str], temperature: float, threads: int = 0):
        super().__init__()
        require("onnx", "the onnx engine", ("onnxruntime",))
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SonocadError(f"{path}: not an ONNX model ONNX Runtime can run ({e.__class__.__name__})") from None
        self.num_outputs = 1 if len(classes) == 2 else len(classes)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.float().cpu().contiguous().numpy()})[0])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.num_outputs)


def load_onnx(path: str | Path) -> Predictor:
    """A Predictor whose one member is an exported model run by ONNX Runtime (its run info from the metadata)."""
    from ..config import RunInfo
    from ..models.infer import InputPipeline, resolve_precision

    path = Path(path)
    require("onnx", "the onnx engine", ("onnx", "onnxruntime"))
    import onnx
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:
        raise SonocadError(f"{path}: not a readable ONNX file ({e.__class__.__name__})") from None
    if METADATA_KEY not in props:
        raise SonocadError(f"{path}: an ONNX file sonocad did not export (no {METADATA_KEY} metadata)")
    info = RunInfo.loads(props[METADATA_KEY].encode(), path)
    model = OnnxModel(path, info.classes, info.temperature)
    shape = model.session.get_inputs()[0].shape           # [batch, channels, height, width]
    if [d for d in shape[2:] if isinstance(d, int)] not in ([], [info.img_size] * 2):
        raise SonocadError(f"{path}: the model takes {shape[2]} x {shape[3]} px images, its {METADATA_KEY} "
                           f"metadata says {info.img_size}: an edited file, not one sonocad export wrote")
    # ONNX Runtime runs on the CPU here (CPUExecutionProvider): its inputs are prepared there, also on a GPU machine
    return Predictor(info, [(model, InputPipeline(info.mean, info.std, resolve_precision("fp32", "cpu")))])
