"""Command line: each verb parses its arguments and calls one library function.

User errors print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
import warnings

from ..config import PRECISIONS
from ..errors import OptionError, SonocadError
from ..runtime.console import show_warning
from .commands import (
    _TRAINING,
    cmd_adapt,
    cmd_calibrate,
    cmd_compare,
    cmd_cv,
    cmd_dedup,
    cmd_evaluate,
    cmd_explain,
    cmd_export,
    cmd_predict,
    cmd_serve,
    cmd_summary,
    cmd_synth,
    cmd_train,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise SonocadError(f"{self.prog}: {message}")


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, generated from the field's type, help text and choices. Defaults
    stay None so that a recipe's preset applies where an option is not given."""
    from ..config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
        kw: dict = {"dest": f.name, "default": None, "help": meta.get("help")}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if typing.get_origin(base) is list:
                base = typing.get_args(base)[0]
                kw["nargs"] = "+" if f.name == "classes" else "*"
            kw.update(type=base, metavar=meta.get("metavar"), choices=meta.get("choices"))
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


_RUNS = "a run directory, a cv folder (its fold models as one ensemble)"
RUN_HELP = f"{_RUNS} or a shipped model (bus-base)"
RUN_OR_ONNX_HELP = f"{_RUNS}, a shipped model (bus-base) or an .onnx file"
INPUTS_HELP = ("image files (PNG, JPEG, BMP, TIFF or DICOM) or folders of them, searched recursively (lesion masks "
               "and hidden files left out)")


def _train_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("data", nargs="+", help="class-folder dataset(s) or CSV manifest(s); several = several sites")
    if verb == "train":
        p.add_argument("--out", help="run directory to write (required, except with --resume)")
        p.add_argument("--resume", metavar="RUN", help="continue the interrupted run RUN from its last checkpoint")
        p.add_argument("--test", dest="test_data", help="evaluate on this dataset instead of a held-out part")
        p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out: the new run is "
                       "built beside it and swapped in when finished")
    else:
        p.add_argument("--out", help="folder to write (required): a run per fold and the pooled figures; finished "
                       "folds found there are reused")
        # train's options, hidden: given to cv they are refused with the reason (cmd_cv), not as unknown
        p.add_argument("--resume", help=argparse.SUPPRESS)
        p.add_argument("--test", dest="test_data", help=argparse.SUPPRESS)
        p.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_options(p)


def _reading_options(p: argparse.ArgumentParser) -> None:
    """Options of the verbs that read images with a trained run."""
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read, each named in "
                   "one line (default: stop at the first)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="arithmetic of the model (default auto: "
                   "bf16 on a GPU and on CPUs fast at it, else fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sonocad", description="Breast-ultrasound lesion classifiers: train, evaluate, predict. "
                     "A research tool, not a diagnostic device.")
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"sonocad {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a classifier and evaluate it on held-out data")
    _train_args(p, "train")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="train with N processes (DistributedDataParallel: one per GPU, or gloo on CPU cores); "
                   "runs torchrun --standalone --nproc-per-node N -m sonocad train ...")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="stratified group K-fold cross-validation of the training recipe")
    _train_args(p, "cv")
    p.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    p.add_argument("--repeats", type=int, default=1, help="repeat with different seeds")
    p.add_argument("--external", help="also evaluate every fold model (and their ensemble) on this dataset")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="train N folds at once, each in its own "
                   "process (one per GPU or a share of the CPU cores); the same figures as one after the other")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("compare", help="paired DeLong test of two runs on the same images")
    p.add_argument("run_a", help=RUN_HELP)
    p.add_argument("run_b", help="the other: " + RUN_HELP)
    p.add_argument("data", help="labelled images both runs are scored on (class folders or a manifest)")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("dedup", help="find exact and near-duplicate images (and label conflicts)")
    p.add_argument("data", help="a class-folder dataset or a CSV manifest")
    p.add_argument("--classes", nargs="+", help="the class folders to search (default: every one)")
    p.add_argument("--method", default="combined", choices=["phash", "embed", "match", "combined"],
                   help="detector: perceptual hash, CNN embedding, cross-correlation match, or pHash + match "
                   "(default combined)")
    p.add_argument("--threshold", type=float, help="linking score of the method (combined: of match; default: the "
                   "method's own, docs/dedup.md)")
    p.add_argument("--out", help="folder for duplicates.csv (path, group, label) and duplicates.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("evaluate", help="evaluate a trained run on another dataset")
    p.add_argument("run", help=RUN_OR_ONNX_HELP)
    p.add_argument("data", nargs="+", help="labelled images (class folders or a manifest); several = several sites")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and report.html")
    _reading_options(p)
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch: the run's PyTorch model; onnx: a file written by sonocad export (auto: by RUN)")
    p.add_argument("--reader-score", metavar="COLUMN", help="the manifest column holding the readers' score "
                   "(BI-RADS) of each image, compared with the model (default: BUS-BRA's BIRADS where the data "
                   "carry it; none: leave it out)")
    p.add_argument("--reader-threshold", type=float, default=4.0, help="the readers' operating point: score at "
                   "or above it (default 4: BI-RADS 4, biopsy recommended)")
    p.add_argument("--shortcut-check", action="store_true",
                   help="also predict with overlays removed and with the lesion hidden (smooth fill, tissue "
                   "texture, a textured box over its outline); needs lesion masks")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="class probabilities for images or folders of images")
    p.add_argument("run", help=RUN_OR_ONNX_HELP)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help=INPUTS_HELP)
    p.add_argument("--csv", help="write the predictions to this CSV instead of standard output")
    p.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM picture of each image into DIR")
    p.add_argument("--masks", metavar="DIR", help="also write each image's predicted lesion mask (PNG, the scan's "
                   "size) into DIR (models trained with lesion masks)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch: the run's PyTorch model; onnx: a file written by sonocad export (auto: by RUN)")
    _reading_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("calibrate", help="fit a run to a new site: temperature and operating points chosen on a "
                       "small labelled local set, written as a new run")
    p.add_argument("run", help="a run directory, or a shipped model (bus-base)")
    p.add_argument("data", nargs="+", help="labelled scans of the new site (class folders or a manifest)")
    p.add_argument("--out", required=True, help="the calibrated run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished result in --out (once the new one "
                   "is complete)")
    _reading_options(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("adapt", help="a model for a new hospital: fine-tune BASE on a few of its labelled scans and "
                       "choose its calibration and operating points on them by cross-fitting")
    p.add_argument("base", help="a shipped model (bus-base), a run directory or a cv folder")
    p.add_argument("data", nargs="+", help="labelled scans of the new site (class folders or a manifest)")
    p.add_argument("--out", required=True, help="the adapted run directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed: folds, augmented views, training order")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds (fewer when a class has fewer "
                   "independent scans)")
    p.add_argument("--blocks", type=int, default=0, help="backbone blocks fine-tuned beside the head (default 0: the "
                   "head alone, on features computed once; 2: also the two that training's phase 2 unfreezes)")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="the high-sensitivity point's target, "
                   "kept on new cases with 95%% confidence where the local cancers allow (default 0.95)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="do not search the local scans for "
                   "duplicates (they are grouped with their patients so copies never cross a fold)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished result in --out (once the new one "
                   "is complete)")
    _reading_options(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("explain", help="where the model looked: a Grad-CAM picture of each scan")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help=INPUTS_HELP)
    p.add_argument("--out", required=True, help="folder for the pictures and explanations.csv")
    p.add_argument("--target", default="default", help="class explained: binary runs the positive class (default) "
                   "or 'other' or a class name; multi-class runs each image's predicted class (default) or a name")
    _reading_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="the run's model as one ONNX file, with its preprocessing in the metadata")
    p.add_argument("run", help="a run directory, a fold of a cv folder, or a shipped model (bus-base)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ, per channel), calibrated on training images")
    p.add_argument("--calibration", help="images to calibrate int8 on (default: the run's training data)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="one scan in a browser, and a JSON API (research tool, not a diagnostic device)")
    p.add_argument("run", help="a run directory, a cv folder or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="arithmetic of the model (default auto)")
    p.add_argument("--token", help="access token the page and API ask for (default: $SONOCAD_TOKEN; needed to serve "
                   "on an address other than this machine's, unless --insecure)")
    p.add_argument("--insecure", action="store_true", help="serve on a network address without an access token")
    p.add_argument("--max-decoding", type=int, default=8, metavar="N", help="uploads decoded at once (default 8)")
    p.add_argument("--max-waiting", type=int, default=32, metavar="N", help="requests that wait for a turn beyond "
                   "those; more are answered 503 (default 32)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("synth", help="write a synthetic B-mode phantom dataset (demo and test data)")
    p.add_argument("out", help="folder to write, in the BUSI layout (class folders, lesion masks beside)")
    p.add_argument("--n", type=int, default=200, help="phantoms, half benign, half malignant (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    p.add_argument("--add", action="store_true", help="write the phantoms into a folder that already holds files "
                   "(beside them: a file of a phantom's name is kept if it is that phantom, else refused)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("summary", help="parameters and memory estimate of a model")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="backbone (default tf_efficientnet_lite0)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--img-size", type=int, help="input side in px (default: the model's own)")
    p.add_argument("--unfreeze", default="2", help="backbone blocks trained in phase 2, as train's --unfreeze "
                   "(default 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):      # file names that are not UTF-8 print (escaped) instead of failing
            stream.reconfigure(errors="backslashreplace")
    saved, warnings.showwarning = warnings.showwarning, show_warning
    _TRAINING.clear()
    try:
        return _run(argv)
    finally:
        warnings.showwarning = saved


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if "" in args.argv:         # an unset shell variable: "" as a path is the current folder, searched whole
            raise SonocadError("an empty argument was given (an unset shell variable?); every path and value "
                               "must be named")
        from ..runtime.allocator import tune_allocator

        tune_allocator()
        args.func(args)
    except OptionError as e:
        print(f"sonocad: error: {e.flag}: {e.message}", file=sys.stderr)
        return 2
    except SonocadError as e:
        print(f"sonocad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run = next((r for r in _TRAINING if (r / "checkpoints" / "last.pt").is_file()
                    and not (r / "run.json").is_file()), None)
        if run is not None:
            print(f"sonocad: interrupted; {run} keeps its last complete epoch's checkpoint "
                  f"(continue with: sonocad train DATA --resume {run})", file=sys.stderr)
        else:
            print("sonocad: interrupted", file=sys.stderr)
        return 130
    return 0
