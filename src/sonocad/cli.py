"""Command line: each verb parses its arguments and calls one library function.

User errors print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import types
import typing
import warnings
from pathlib import Path

from .config import PRECISIONS
from .console import print_explanation, print_fold_points, print_metrics, show_warning, warn_bad
from .errors import OptionError, SonocadError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise SonocadError(f"{self.prog}: {message}")


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, generated from the field's type, help text and choices. Defaults
    stay None so that a recipe's preset applies where an option is not given."""
    from .config import TrainConfig

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


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="class-folder dataset(s) or CSV manifest(s); several = several sites")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run RUN from its last checkpoint")
    p.add_argument("--test", dest="test_data", help="evaluate on this dataset instead of a held-out part")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out: the new run is "
                   "built beside it and swapped in when finished")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_options(p)


_TRAINING: list[Path] = []     # the run being trained, for the message on Ctrl-C


def _config_fields() -> set[str]:
    from .config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _config(a):
    from .config import TrainConfig

    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    return TrainConfig.from_recipe(values.pop("recipe") or "default", **values)


def cmd_train(a) -> None:
    from .train import fit

    given = {}
    if a.resume:
        if a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise SonocadError("--resume RUN continues RUN in place; leave out --out or give the same folder")
        a.out, cfg = a.resume, None
        given = {k: v for k, v in vars(a).items() if k in _config_fields() and v is not None}
    elif not a.out:
        raise SonocadError("train: the following arguments are required: --out")
    else:
        cfg = _config(a)
    _TRAINING.append(Path(a.out))
    m = fit(a.data, a.out, cfg, test_data=a.test_data, progress=not a.quiet, resume=bool(a.resume),
            overwrite=a.overwrite, **given)
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m, "test")
    print_explanation(m)
    t = m["timing_seconds"]
    print(f"time: {t['total']:.0f} s (data {t['data']:.0f}, phase 1 {t['phase1_head']:.0f}, "
          f"phase 2 {t['phase2_finetune']:.0f}), precision {m['precision']}")
    print(f"report: {Path(a.out) / 'report.html'}")


def cmd_evaluate(a) -> None:
    from .evaluate import evaluate_run

    m = evaluate_run(a.run, a.data if len(a.data) > 1 else a.data[0], a.out, skip_bad=a.skip_bad,
                     precision=a.precision, shortcut=a.shortcut_check, engine=a.engine)
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m, "evaluation")
    warn_bad(m.get("shortcut_check", {}).get("skipped_bad_images", []))
    print_explanation(m)
    if "shortcut_check" in m:
        from .shortcut import VERSIONS

        sc = m["shortcut_check"]
        for k in VERSIONS:
            print(f"shortcut check, {k.replace('_', ' ')}: AUC {sc[k]['auc']:.3f} "
                  f"(95% CI {sc[k]['auc_ci'][0]:.3f}-{sc[k]['auc_ci'][1]:.3f}), "
                  f"mean |change| {sc[k]['mean_abs_change']:.3f} (n={sc['n']})")
    print(f"report: {Path(a.out) / 'report.html'}")


def cmd_predict(a) -> None:
    from .evaluate import predict_paths

    if a.csv:
        from .io import ensure_writable_dir
        from .rundir import refuse_writing_into_runs

        try:
            if Path(a.csv).is_dir():
                raise OptionError("csv", f"{a.csv} is a folder; give a file name")
        except OSError as e:
            raise OptionError("csv", f"{a.csv}: {e.strerror or e}") from None
        refuse_writing_into_runs(a.csv, [a.run], "csv")
        ensure_writable_dir(Path(a.csv).parent, "csv")
    rows = predict_paths(a.run, a.inputs, skip_bad=a.skip_bad, precision=a.precision, heatmaps=a.heatmaps,
                         engine=a.engine)
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    warn_bad([r["error"] for r in errors])
    fields = list(rows[0]) if rows else ["path", "predicted"]
    if a.csv:
        import io

        from .io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(a.csv, buf.getvalue())
        print(f"wrote {len(rows)} prediction(s) to {a.csv}")
    else:
        w = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})


def cmd_explain(a) -> None:
    from .evaluate import explain_paths

    rows = explain_paths(a.run, a.inputs, a.out, target=a.target, skip_bad=a.skip_bad, precision=a.precision)
    warn_bad([r["error"] for r in rows if "error" in r])
    done = [r for r in rows if "error" not in r]
    hits = [r["pointing_hit"] for r in done if "pointing_hit" in r]
    agree = (f"; the heatmap's maximum on the lesion (pointing game) in {sum(hits)} of {len(hits)} with a mask"
             if hits else "")
    print(f"wrote {len(done)} heatmap(s) and explanations.csv to {a.out}{agree}")


def cmd_export(a) -> None:
    from .export import export_onnx

    r = export_onnx(a.run, a.out, int8=a.int8, calibration=a.calibration)
    print(f"wrote {r['path']} ({r['bytes'] / 2**20:.1f} MiB, {'int8' if r['int8'] else 'fp32'}, input "
          f"{r['input_size']} px; run it with: sonocad predict {r['path']} IMAGES)")


def cmd_cv(a) -> None:
    from .cv import cross_validate

    if not a.out:
        raise SonocadError("cv: the following arguments are required: --out")
    if a.resume or a.test_data or a.overwrite:
        raise SonocadError("cv: --resume, --test and --overwrite are train options; cv reuses the finished folds "
                           "in --out by itself (choose a new --out to start again)")
    cfg = _config(a)
    m = cross_validate(a.data, a.out, cfg, folds=a.folds, repeats=a.repeats, external=a.external,
                       progress=not a.quiet)
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m["pooled"], f"pooled out-of-fold ({a.folds} folds)")
    ms = m["mean_sd"]["auc"]
    print(f"per-fold AUC mean {ms[0]:.3f} ± sd {ms[1]:.3f}")
    print_fold_points(m["pooled"])
    for site, sm in m.get("per_site", {}).items():
        print_metrics(sm, f"site {site}")
        print_fold_points(sm)
    if "external" in m:
        print_metrics(m["external"]["ensemble"], f"external {a.external} (ensemble of fold models)")
        e = m["external"]["per_fold_auc_mean_sd"]
        print(f"external per-fold AUC mean {e[0]:.3f} ± sd {e[1]:.3f}")
    print(f"time: {m['seconds']:.0f} s; report: {Path(a.out) / 'report.html'}")


def cmd_compare(a) -> None:
    from .evaluate import compare_runs

    r = compare_runs(a.run_a, a.run_b, a.data, skip_bad=a.skip_bad)
    print(f"n={r['n']}  AUC A {r['auc_a']:.3f}  AUC B {r['auc_b']:.3f}  difference {r['diff']:+.3f}  "
          f"paired DeLong z={r['z']:.2f} p={r['p_value']:.4f}")


def cmd_dedup(a) -> None:
    from .data.discover import discover
    from .dedup import find_duplicates

    samples = discover(a.data, a.classes)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    res = find_duplicates(paths, labels, method=a.method, threshold=a.threshold, progress=not a.quiet)
    sizes = [len(g) for g in res.groups]
    print(f"{len(paths)} images: {len(res.groups)} duplicate groups ({sum(sizes)} images, largest {max(sizes, default=0)}), "
          f"{len(res.conflicts)} with members of different classes")
    for g in res.conflicts:
        print("  label conflict: " + "; ".join(f"{paths[i]} ({labels[i]})" for i in g))
    if a.out:
        from .dedup import summarize
        from .io import atomic_write_text, ensure_writable_dir

        out = ensure_writable_dir(a.out)
        res.to_csv(out / "duplicates.csv", paths, labels)
        atomic_write_text(out / "duplicates.json", json.dumps(summarize(res, paths, labels), indent=1))
        print(f"wrote {out / 'duplicates.csv'} and {out / 'duplicates.json'} (every group and linked pair)")


def cmd_serve(a) -> None:
    from .serve import serve

    serve(a.run, a.host, a.port, a.precision)


def cmd_synth(a) -> None:
    from .data.synth import write_phantom_set

    info = write_phantom_set(a.out, n=a.n, seed=a.seed, size=a.size)
    print(f"wrote {info['n']} phantom images {info['n_per_class']} to {info['out']}")


def cmd_summary(a) -> None:
    from .summary import format_summary, model_summary

    s = model_summary(a.model, a.batch_size, a.img_size, a.unfreeze)
    print(json.dumps(s, indent=2) if a.json else format_summary(s))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sonocad", description="Breast-ultrasound lesion classifiers: train, evaluate, predict. "
                     "A research tool, not a diagnostic device.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sonocad {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a classifier and evaluate it on held-out data")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="stratified group K-fold cross-validation of the training recipe")
    _train_args(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="repeat with different seeds")
    p.add_argument("--external", help="also evaluate every fold model (and their ensemble) on this dataset")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("compare", help="paired DeLong test of two runs on the same images")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("data")
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("dedup", help="find exact and near-duplicate images (and label conflicts)")
    p.add_argument("data")
    p.add_argument("--classes", nargs="+")
    p.add_argument("--method", default="combined", choices=["phash", "embed", "match", "combined"],
                   help="detector: perceptual hash, CNN embedding, cross-correlation match, or pHash + match")
    p.add_argument("--threshold", type=float, help="linking score of the method (combined: of match)")
    p.add_argument("--out", help="folder for duplicates.csv (path, group, label) and duplicates.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("evaluate", help="evaluate a trained run on another dataset")
    p.add_argument("run")
    p.add_argument("data", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch: the run's PyTorch model; onnx: a file written by sonocad export (auto: by RUN)")
    p.add_argument("--shortcut-check", action="store_true",
                   help="also predict with overlays removed and with the lesion hidden (smooth fill, tissue "
                   "texture, a textured box over its outline); needs lesion masks")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="class probabilities for images or folders of images")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--csv", help="write the predictions to this CSV instead of standard output")
    p.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM picture of each image into DIR")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch: the run's PyTorch model; onnx: a file written by sonocad export (auto: by RUN)")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="where the model looked: a Grad-CAM picture of each scan")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="folder for the pictures and explanations.csv")
    p.add_argument("--target", default="default", help="class explained: binary runs the positive class (default) "
                   "or 'other' or a class name; multi-class runs each image's predicted class (default) or a name")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="the run's model as one ONNX file, with its preprocessing in the metadata")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ, per channel), calibrated on training images")
    p.add_argument("--calibration", help="images to calibrate int8 on (default: the run's training data)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="one scan in a browser, and a JSON API (research tool, not a diagnostic device)")
    p.add_argument("run", help="a run directory, a cv folder or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("synth", help="write a synthetic B-mode phantom dataset (demo and test data)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("summary", help="parameters and memory estimate of a model")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int)
    p.add_argument("--unfreeze", default="2")
    p.add_argument("--json", action="store_true")
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
        from .allocator import tune_allocator

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
