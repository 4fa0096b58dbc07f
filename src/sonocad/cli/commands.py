"""The command line's verbs: each parses nothing itself, calls one library function and prints its figures.
sonocad.cli.main builds the parser that calls these."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..errors import OptionError, SonocadError
from ..runtime.console import print_explanation, print_fold_points, print_metrics, warn_bad
from ..runtime.extras import require

_TRAINING: list[Path] = []     # the run being trained, for the message on Ctrl-C


def _config_fields() -> set[str]:
    from ..config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _config(a):
    from ..config import TrainConfig

    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    return TrainConfig.from_recipe(values.pop("recipe") or "default", **values)


def cmd_train(a) -> None:
    from ..runtime import dist
    from ..workflows.train import fit

    if a.devices != 1 and not dist.launched():
        return _launch(a)
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
    if not dist.is_main():
        return
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m, "test")
    print_explanation(m)
    t = m["timing_seconds"]
    print(f"time: {t['total']:.0f} s (data {t['data']:.0f}, phase 1 {t['phase1_head']:.0f}, "
          f"phase 2 {t['phase2_finetune']:.0f}), precision {m['precision']}")
    print(f"report: {Path(a.out) / 'report.html'}")


def _launch(a) -> None:
    """`train --devices N`: the same command under torchrun, N processes on this machine."""
    import subprocess

    if not 1 <= a.devices <= 1024:
        raise OptionError("devices", f"must be between 1 and 1024, not {a.devices}")
    import torch

    if torch.cuda.is_available() and a.devices > torch.cuda.device_count():
        raise OptionError("devices", f"{a.devices} processes but {torch.cuda.device_count()} GPU(s) here; on a GPU "
                          "machine each process trains on a GPU of its own")
    argv, skip = [], False
    for arg in a.argv:
        if skip or arg == "--devices":
            skip = not skip and arg == "--devices"
            continue
        if not arg.startswith("--devices="):
            argv.append(arg)
    rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc-per-node={a.devices}", "-m", "sonocad", *argv]).returncode
    if rc:
        run = a.resume or a.out
        if run and (Path(run) / "checkpoints" / "last.pt").is_file():
            print(f"sonocad: training under torchrun stopped (exit code {rc}); its last finished epoch is kept: "
                  f"sonocad train {a.data} --resume {run} --devices {a.devices} continues it", file=sys.stderr)
        raise SystemExit(rc)


def print_readers(m: dict) -> None:
    """The readers' line of an evaluation or a site's out-of-fold figures, when the data carry reader scores."""
    r = m.get("reader")
    if r and "error" in r:
        print(f"readers ({r['column']}): not compared: {r['error']}")
    elif r:
        o = r["operating_point"]
        print(f"readers ({r['column']}) on the same images: AUC {r['auc']:.3f} (95% CI {r['auc_ci'][0]:.3f}-"
              f"{r['auc_ci'][1]:.3f}); model minus readers {r['model_minus_reader']:+.3f}, paired DeLong p="
              f"{r['p_value']:.3g}; readers at {o['rule']}: sensitivity {o['sensitivity']:.3f}, specificity "
              f"{o['specificity']:.3f}; the model at that specificity: sensitivity "
              f"{r['model_sensitivity_at_reader_specificity']:.3f}")


def _need_onnx_engine(a) -> None:
    """An exported .onnx model (or --engine onnx) runs with ONNX Runtime: checked before any work."""
    if a.engine == "onnx" or str(a.run).endswith(".onnx"):
        require("onnx", "the onnx engine", ("onnx", "onnxruntime"))


def cmd_evaluate(a) -> None:
    from ..workflows.evaluate import evaluate_run

    _need_onnx_engine(a)

    m = evaluate_run(a.run, a.data if len(a.data) > 1 else a.data[0], a.out, skip_bad=a.skip_bad,
                     precision=a.precision, shortcut=a.shortcut_check, engine=a.engine,
                     reader_score=a.reader_score, reader_threshold=a.reader_threshold)
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m, "evaluation")
    if m.get("site_notice"):
        print(f"note: {m['site_notice']}")
    print_readers(m)
    warn_bad(m.get("shortcut_check", {}).get("skipped_bad_images", []))
    print_explanation(m)
    if "shortcut_check" in m:
        from ..analysis.shortcut import VERSIONS

        sc = m["shortcut_check"]
        for k in VERSIONS:
            print(f"shortcut check, {k.replace('_', ' ')}: AUC {sc[k]['auc']:.3f} "
                  f"(95% CI {sc[k]['auc_ci'][0]:.3f}-{sc[k]['auc_ci'][1]:.3f}), "
                  f"mean |change| {sc[k]['mean_abs_change']:.3f} (n={sc['n']})")
    print(f"report: {Path(a.out) / 'report.html'}")


def _check_csv_target(a) -> None:
    """`predict --csv`: a new file, or an earlier predictions CSV; never an image, an input or another file."""
    from ..data.images import IMAGE_SUFFIXES
    from ..io.files import refuse_replacing
    from ..io.rundir import refuse_writing_into_runs

    csv_path = Path(a.csv)
    if a.csv == "-" or a.csv.endswith(("/", os.sep)) or csv_path.is_dir():
        raise OptionError("csv", f"{a.csv!r} is not a file name (without --csv the table goes to standard output)")
    if csv_path.suffix.lower() in IMAGE_SUFFIXES:
        raise OptionError("csv", f"{a.csv} is named like an image; a CSV file's name ends in .csv (is an image "
                          "listed after --csv by mistake?)")
    if any(csv_path.resolve() == Path(i).resolve() for i in a.inputs):
        raise OptionError("csv", f"{a.csv} is one of the images to predict; choose another name")
    refuse_writing_into_runs(a.csv, [a.run], "csv")
    refuse_replacing(csv_path, "csv", _predictions_csv, "a predictions CSV written by sonocad predict")
    parent = next((d for d in csv_path.absolute().parents if d.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError("csv", f"{csv_path.parent}: cannot write there")


def _predictions_csv(path: Path) -> bool:
    from ..io.files import csv_fields

    fields = csv_fields(path)
    return fields[:1] == ["path"] and "predicted" in fields


def cmd_predict(a) -> None:
    from ..io.files import removed_if_failed
    from ..workflows.evaluate import predict_paths

    _need_onnx_engine(a)

    if a.csv:
        _check_csv_target(a)
    with removed_if_failed(Path(a.csv).parent if a.csv else None, a.heatmaps, a.masks):
        rows = predict_paths(a.run, a.inputs, skip_bad=a.skip_bad, precision=a.precision, heatmaps=a.heatmaps,
                             engine=a.engine, masks=a.masks)
        errors = [r for r in rows if "error" in r]
        rows = [r for r in rows if "error" not in r]
        warn_bad([r["error"] for r in errors])
        if errors and not rows:
            raise SonocadError(f"none of the {len(errors)} image(s) could be read (first: {errors[0]['error']})")
        fields = list(rows[0]) if rows else ["path", "predicted"]
        if a.csv:
            import io

            from ..io.files import atomic_write_text

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
    from ..workflows.evaluate import site_notice

    notice = site_notice(a.run, a.engine)
    if notice:
        print(f"sonocad: note: {notice}", file=sys.stderr)


def cmd_explain(a) -> None:
    from ..workflows.evaluate import explain_paths

    rows = explain_paths(a.run, a.inputs, a.out, target=a.target, skip_bad=a.skip_bad, precision=a.precision)
    warn_bad([r["error"] for r in rows if "error" in r])
    done = [r for r in rows if "error" not in r]
    hits = [r["pointing_hit"] for r in done if "pointing_hit" in r]
    agree = (f"; the heatmap's maximum on the lesion (pointing game) in {sum(hits)} of {len(hits)} with a mask"
             if hits else "")
    print(f"wrote {len(done)} heatmap(s) and explanations.csv to {a.out}{agree}")


def cmd_export(a) -> None:
    from ..deploy.export import export_onnx

    require("onnx", "sonocad export")

    r = export_onnx(a.run, a.out, int8=a.int8, calibration=a.calibration)
    print(f"wrote {r['path']} ({r['bytes'] / 2**20:.1f} MiB, {'int8' if r['int8'] else 'fp32'}, input "
          f"{r['input_size']} px; run it with: sonocad predict {r['path']} IMAGES)")


def cmd_cv(a) -> None:
    from ..workflows.cv import cross_validate

    if not a.out:
        raise SonocadError("cv: the following arguments are required: --out")
    if a.resume or a.test_data or a.overwrite:
        raise SonocadError("cv: --resume, --test and --overwrite are train options; cv reuses the finished folds "
                           "in --out by itself (choose a new --out to start again)")
    cfg = _config(a)
    m = cross_validate(a.data, a.out, cfg, folds=a.folds, repeats=a.repeats, external=a.external,
                       progress=not a.quiet, workers=a.workers)
    warn_bad(m["data"].get("skipped_bad_images", []))
    print_metrics(m["pooled"], f"pooled out-of-fold ({a.folds} folds)")
    ms = m["mean_sd"]["auc"]
    print(f"per-fold AUC mean {ms[0]:.3f} ± sd {ms[1]:.3f}")
    print_fold_points(m["pooled"])
    for site, sm in m.get("per_site", {}).items():
        print_metrics(sm, f"site {site}")
        print_fold_points(sm)
        print_readers(sm)
    if "external" in m:
        print_metrics(m["external"]["ensemble"], f"external {a.external} (ensemble of fold models)")
        e = m["external"]["per_fold_auc_mean_sd"]
        print(f"external per-fold AUC mean {e[0]:.3f} ± sd {e[1]:.3f}")
    print(f"time: {m['seconds']:.0f} s; report: {Path(a.out) / 'report.html'}")


def cmd_compare(a) -> None:
    from ..workflows.evaluate import compare_runs

    r = compare_runs(a.run_a, a.run_b, a.data, skip_bad=a.skip_bad)
    print(f"n={r['n']}  AUC A {r['auc_a']:.3f}  AUC B {r['auc_b']:.3f}  difference {r['diff']:+.3f}  "
          f"paired DeLong z={r['z']:.2f} p={r['p_value']:.4f}")


def cmd_dedup(a) -> None:
    from ..data.discover import discover
    from ..dedup import find_duplicates

    if a.out:           # before the search, which may take minutes
        from ..io.files import csv_fields, refuse_replacing
        from ..io.rundir import refuse_result_folder, refuse_writing_into_runs

        refuse_writing_into_runs(a.out, [a.data], "out")
        refuse_result_folder(a.out, "out")
        if Path(a.out).exists() and not Path(a.out).is_dir():
            raise OptionError("out", f"{a.out} is a file, not a folder")
        refuse_replacing(Path(a.out) / "duplicates.csv", "out", lambda p: csv_fields(p) == ["path", "group", "label"],
                         "a duplicates.csv written by sonocad dedup")
        refuse_replacing(Path(a.out) / "duplicates.json", "out", _dedup_json, "a duplicates.json written by sonocad "
                         "dedup")
    samples = discover(a.data, a.classes)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    res = find_duplicates(paths, labels, method=a.method, threshold=a.threshold, progress=not a.quiet)
    sizes = [len(g) for g in res.groups]
    print(f"{len(paths)} images: {len(res.groups)} duplicate groups ({sum(sizes)} images, largest {max(sizes, default=0)}), "
          f"{len(res.conflicts)} with members of different classes")
    for g in res.conflicts:
        print("  label conflict: " + "; ".join(f"{paths[i]} ({labels[i]})" for i in g))
    if a.out:
        from ..dedup import summarize
        from ..io.files import atomic_write_text, ensure_writable_dir

        out = ensure_writable_dir(a.out)
        res.to_csv(out / "duplicates.csv", paths, labels)
        atomic_write_text(out / "duplicates.json", json.dumps(summarize(res, paths, labels), indent=1))
        print(f"wrote {out / 'duplicates.csv'} and {out / 'duplicates.json'} (every group and linked pair)")


def _dedup_json(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and {"images", "groups", "conflicts"} <= set(d)


def cmd_serve(a) -> None:
    require("serve", "sonocad serve")
    if str(a.run).endswith(".onnx"):
        require("onnx", "serving an .onnx file", ("onnx", "onnxruntime"))
    from ..serve.app import serve

    serve(a.run, a.host, a.port, a.precision, token=a.token, insecure=a.insecure, max_decoding=a.max_decoding,
          max_waiting=a.max_waiting)


def cmd_synth(a) -> None:
    from ..data.synth import write_phantom_set

    info = write_phantom_set(a.out, n=a.n, seed=a.seed, size=a.size, add=a.add)
    kept = 2 * info["n"] - info["written"]
    print(f"wrote {info['n']} phantom images {info['n_per_class']} to {info['out']}"
          + (f" ({kept} of their files were there already, identical, and kept)" if kept else ""))


def cmd_summary(a) -> None:
    from ..analysis.summary import format_summary, model_summary

    s = model_summary(a.model, a.batch_size, a.img_size, a.unfreeze)
    print(json.dumps(s, indent=2) if a.json else format_summary(s))


def cmd_calibrate(a) -> None:
    from ..workflows.calibrate import calibrate_run

    m = calibrate_run(a.run, a.data if len(a.data) > 1 else a.data[0], a.out, skip_bad=a.skip_bad,
                      precision=a.precision, overwrite=a.overwrite)
    warn_bad(m["data"].get("skipped_bad_images", []))
    t = m["temperature"]
    print(f"local set: n={m['n']} {m['n_per_class']}  AUC {m['auc']:.3f} (95% CI {m['auc_ci'][0]:.3f}-"
          f"{m['auc_ci'][1]:.3f}); temperature {t['before']:.3f} -> {t['after']:.3f}, ECE "
          f"{m['calibration']['before']['ece']:.3f} -> {m['calibration']['after']['ece']:.3f}")
    for name, op in m["operating_points"].items():
        old = m["before_calibration"]["operating_points"].get(name)
        b = op.get("bootstrap", {})
        line = (f"  {name}: threshold {op['threshold']:.4f}, on the local set sensitivity {op['sensitivity']:.3f} "
                f"specificity {op['specificity']:.3f}")
        if "promised_sensitivity" in op:
            line += f"; promises sensitivity >= {op['promised_sensitivity']:.3f} on new cases (95% confidence)"
        if b:
            s, sp = b["left_out_sensitivity_95"], b["left_out_specificity_95"]
            line += f"; bootstrap, on left-out cases: sensitivity {s[0]:.2f}-{s[1]:.2f}, specificity {sp[0]:.2f}-{sp[1]:.2f}"
        if old:
            line += f" (the run's own {name} point here: sensitivity {old['sensitivity']:.3f}, specificity {old['specificity']:.3f})"
        print(line)
    print(f"calibrated run: {a.out} (use it like any run: sonocad evaluate/predict/serve {a.out})")



def cmd_adapt(a) -> None:
    from ..workflows.adapt import adapt

    m = adapt(a.base, a.data if len(a.data) > 1 else a.data[0], a.out, seed=a.seed, folds=a.folds,
              target_sensitivity=a.target_sensitivity, blocks=a.blocks, dedup=a.dedup, skip_bad=a.skip_bad, precision=a.precision,
              overwrite=a.overwrite)
    warn_bad(m["data"].get("skipped_bad_images", []))
    r, base = m["adapt"], m["base_on_local"]
    counts = ", ".join(f"{n} {c}" for c, n in r["n_per_class"].items())
    if r["mode"] == "cross-fitted":
        what = f"the head and {r['blocks']} backbone block(s)" if r["blocks"] else "the head"
        print(f"local scans: {counts}; {r['folds']}-fold cross-fitting, the folds settled on {r['epochs']} epoch(s) "
              f"of training {what} (0: the base as it is)")
        where = "out of fold"
    else:
        print(f"sonocad: {r['note']}", file=sys.stderr)
        where = "on the scans it was fitted on"
    print(f"AUC {where} {m['auc']:.3f} (95% CI {m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f}); the base model as it is "
          f"on these scans: {base['auc']:.3f} ({base['auc_ci'][0]:.3f}-{base['auc_ci'][1]:.3f})")
    for name, op in m["operating_points"].items():
        s, sp = op["sensitivity_ci"], op["specificity_ci"]
        line = (f"  {name}: threshold {op['threshold']:.4f}, {where}: sensitivity {op['sensitivity']:.3f} "
                f"({s[0]:.2f}-{s[1]:.2f}), specificity {op['specificity']:.3f} ({sp[0]:.2f}-{sp[1]:.2f})")
        if "promised_sensitivity" in op:
            line += (f"; promises sensitivity >= {op['promised_sensitivity']:.3f} on new cases (95% confidence, "
                     f"{op['rule']})")
        print(line)
    print(f"adapted run: {a.out} (use it like any run: sonocad evaluate/predict/serve {a.out}; evaluate it on "
          "other scans of the site for figures at its thresholds)")
