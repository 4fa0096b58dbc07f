"""Plots (PNG) and one self-contained report.html from a run's predictions, metrics and log."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from ..io.files import atomic_path, atomic_write_text  # noqa: E402
from ..runtime.console import promise_verdict  # noqa: E402

DISCLAIMER = ("sonocad is a research tool. Its outputs are not a diagnosis and it is not a medical device; "
              "figures hold only for the data they were measured on.")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(y_pos: np.ndarray, prob: np.ndarray, metrics: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if len(np.unique(y_pos)) == 2:
        grid, lo_band, hi_band = roc_band(y_pos, prob)
        ax.fill_between(grid, lo_band, hi_band, color="C0", alpha=0.2, lw=0, label="95% band (bootstrap)")
        fpr, tpr, _ = roc_curve(y_pos, prob)
        lo, hi = metrics.get("auc_ci", [float("nan")] * 2)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {metrics['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
        for name, op in metrics.get("operating_points", {}).items():
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", label=f"{name} (t={op['threshold']:.2f})")
        r = metrics.get("reader")
        if r:
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], "-", color="C3", lw=1.5, marker=".",
                    label=f"readers' {r['column']} AUC {r['auc']:.3f} (p={r['p_value']:.3g})")
            o = r["operating_point"]
            ax.plot(1 - o["specificity"], o["sensitivity"], "s", color="C3", label=f"readers: {o['rule']}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test data)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def roc_points(y_pos: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of sklearn's `roc_curve(y_pos, prob)` (collinear points dropped), without its input checks:
    the bootstrap band calls it hundreds of times per report."""
    order = np.argsort(-prob, kind="mergesort")
    score, y = prob[order], y_pos[order]
    ends = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]       # the last row of each distinct score
    tps = np.cumsum(y)[ends].astype(float)
    fps = 1.0 + ends - tps
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def roc_band(y_pos: np.ndarray, prob: np.ndarray, n_boot: int = 300, seed: int = 0):
    """Pointwise 95% band of the ROC curve (sensitivity at each 1 - specificity) by stratified bootstrap."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, 101)
    y_pos, prob = np.asarray(y_pos), np.asarray(prob, float)
    pos, neg = np.flatnonzero(y_pos == 1), np.flatnonzero(y_pos == 0)
    curves = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr = roc_points(y_pos[idx], prob[idx])
        curves.append(np.interp(grid, fpr, tpr))
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return grid, lo, hi


def plot_pr(y_pos: np.ndarray, prob: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if len(np.unique(y_pos)) == 2:
        precision, recall, _ = precision_recall_curve(y_pos, prob)
        ax.plot(recall, precision, lw=2, label=f"average precision {average_precision_score(y_pos, prob):.3f}")
        ax.axhline(y_pos.mean(), color="k", ls="--", lw=1, label=f"prevalence {y_pos.mean():.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="precision-recall", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(classes), 3.0 + 0.4 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_curves(log: list[dict], path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(1, len(log) + 1)
    a.plot(x, [r["loss"] for r in log], label="train loss")
    a.plot(x, [r["val_loss"] for r in log], label="val loss")
    b.plot(x, [r["val_auc"] for r in log], label="val AUC", color="C2")
    b.plot(x, [r["val_accuracy"] for r in log], label="val accuracy", color="C3")
    switch = [i + 1 for i in range(1, len(log)) if log[i]["phase"] != log[i - 1]["phase"]]
    for ax in (a, b):
        for s in switch:
            ax.axvline(s - 0.5, color="gray", ls=":", lw=1)
        ax.set_xlabel("epoch (phase 1 head, then phase 2 fine-tuning)")
        ax.legend(fontsize=8)
    a.set_title("loss")
    b.set_title("validation")
    return _save(fig, path)


def plot_calibration(cal: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    conf = np.asarray(cal["bin_confidence"], float)
    acc = np.asarray(cal["bin_accuracy"], float)
    ok = np.isfinite(conf) & np.isfinite(acc)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.plot(conf[ok], acc[ok], "o-")
    ax.set(xlabel="predicted probability", ylabel="observed fraction positive",
           title=f"reliability (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})", xlim=(0, 1), ylim=(0, 1))
    return _save(fig, path)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _num(v) -> str:
    """A value for the report: floats with 3 decimals, or 3 significant digits where 3 decimals would hide
    them (learning rates, weight decay)."""
    if isinstance(v, float):
        if not np.isfinite(v):
            return "n/a"
        return f"{v:.3g}" if v != 0 and (abs(v) < 0.01 or abs(v) >= 1e6) else f"{v:.3f}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"{_num(v[0])} – {_num(v[1])}"
    return html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))


def html_table(header: list[str], rows: list[list]) -> str:
    """A table with a header row; floats shown with 3 decimals, [lo, hi] pairs as ranges."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_num(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(out: Path, metrics: dict, y: np.ndarray, probs: np.ndarray, info, log: list[dict] | None,
                 title: str, extra_sections: list[str] | None = None) -> Path:
    """Write plots/*.png and report.html (plots inlined) into `out`."""
    from .metrics import calibration

    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    classes = info.classes
    figs = []
    sections = []
    if len(classes) == 2:
        y_pos = (y == 1).astype(int)
        figs.append(plot_roc(y_pos, probs[:, 1], metrics, plots / "roc.png"))
        figs.append(plot_pr(y_pos, probs[:, 1], plots / "pr.png"))
        figs.append(plot_confusion(metrics["confusion_matrix"], classes, plots / "confusion_matrix.png",
                                   f"threshold {metrics['threshold']:.2f}"))
        for name, op in metrics.get("operating_points", {}).items():
            if name != "default":
                figs.append(plot_confusion(op["confusion_matrix"], classes, plots / f"confusion_{name}.png",
                                           f"{name} (threshold {op['threshold']:.2f})"))
        if len(y):
            cal = calibration(y_pos, probs[:, 1])
            metrics_cal = {"ece": cal["ece"], "brier": cal["brier"]}
            figs.append(plot_calibration(cal, plots / "calibration.png"))
        else:
            metrics_cal = {}
        rows = [("AUC", metrics["auc"]), ("AUC 95% CI (" + metrics.get("auc_ci_method", "") + ")", metrics["auc_ci"]),
                ("sensitivity", metrics["sensitivity"]), ("sensitivity 95% CI (Wilson)", metrics["sensitivity_ci"]),
                ("specificity", metrics["specificity"]), ("specificity 95% CI (Wilson)", metrics["specificity_ci"]),
                ("balanced accuracy", metrics["balanced_accuracy"]), ("accuracy", metrics["accuracy"]),
                ("PPV", metrics["ppv"]), ("NPV", metrics["npv"]), ("threshold", metrics["threshold"]),
                ("sensitivity at specificity ≥ 0.90", metrics["sens_at_spec90"]),
                ("specificity at sensitivity ≥ 0.95", metrics["spec_at_sens95"]),
                *[(k, v) for k, v in metrics_cal.items()],
                ("positive class", info.positive), ("n", metrics["n"]), ("n per class", metrics["n_per_class"])]
        sections.append("<h2>Results</h2>" + _table(rows))
        ops = metrics.get("operating_points", {})
        if ops:
            head = "<tr><th>operating point</th><th>threshold</th><th>sensitivity (95% CI)</th>" \
                   "<th>promised sensitivity (kept?)</th><th>specificity (95% CI)</th><th>PPV</th><th>NPV</th>" \
                   "<th>confusion [[TN, FP], [FN, TP]]</th></tr>"

            def promise(o):
                return "" if "promised_sensitivity" not in o else \
                    f"≥ {_num(o['promised_sensitivity'])} ({promise_verdict(o)})"
            body = "".join(
                f"<tr><td>{html.escape(n)}</td><td>{_num(o['threshold'])}</td>"
                f"<td>{_num(o['sensitivity'])} ({_num(o['sensitivity_ci'])})</td><td>{promise(o)}</td>"
                f"<td>{_num(o['specificity'])} ({_num(o['specificity_ci'])})</td><td>{_num(o['ppv'])}</td>"
                f"<td>{_num(o['npv'])}</td><td>{o['confusion_matrix']}</td></tr>" for n, o in ops.items())
            chosen = html.escape(str((info.operating_points or {}).get("chosen_on", "the training run's validation data")))
            sections.append(f"<h2>Operating points</h2><p>Thresholds were chosen on {chosen} and applied "
                            "unchanged here: default 0.5, Youden's J, and high sensitivity: the largest threshold "
                            "whose sensitivity on new cases is at least 0.95 with 95% confidence (one-sided "
                            "Clopper-Pearson bound), or, where those data hold too few cancers for that, the "
                            "threshold a new cancer falls below with probability 0.05 were their logits normal "
                            "(at most their lowest cancer's score); its promised sensitivity is the bound it "
                            "reaches.</p>"
                            f"<table>{head}{body}</table>")
    else:
        figs.append(plot_confusion(metrics["confusion_matrix"], classes, plots / "confusion_matrix.png", "argmax"))
        sections.append("<h2>Results</h2>" + _table(
            [("macro AUC (one-vs-rest)", metrics["auc"]), ("accuracy", metrics["accuracy"]),
             ("balanced accuracy", metrics["balanced_accuracy"]), ("n", metrics["n"]),
             ("n per class", metrics["n_per_class"])]))
    sections += extra_sections or []
    if log:
        figs.append(plot_curves(log, plots / "training_curves.png"))
    if "data" in metrics:
        sections.append("<h2>Data</h2>" + _table(list(metrics["data"].items())))
    if "timing_seconds" in metrics:
        sections.append("<h2>Time and model</h2>" + _table(
            [*[(f"{k} (s)", v) for k, v in metrics["timing_seconds"].items()],
             ("precision", metrics.get("precision")), ("parameters", metrics.get("parameters"))]))
    sections.append("<h2>Configuration</h2>" + _table(list(info.config.to_dict().items())))
    data = metrics.get("data")
    line = info.site_notice(str(data.get("run") if isinstance(data, dict) and data.get("run") else "RUN"))
    notice = f'<p class="note" id="site-notice">Note: {html.escape(line)}.</p>' if line else ""
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:90%}}img{{max-width:100%;margin:4px}}.note{{background:#fff4e0;padding:.6em;border-left:4px solid #e90}}
</style></head><body><h1>{html.escape(title)}</h1><p class="note">{html.escape(DISCLAIMER)}</p>
{notice}{''.join(sections)}<h2>Plots</h2>{''.join(_img(f) for f in figs)}</body></html>"""
    atomic_write_text(out / "report.html", doc)
    return out / "report.html"
