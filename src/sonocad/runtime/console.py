"""What the command line prints: figures with their intervals, warnings; one line each."""
from __future__ import annotations

import sys
import warnings

from ..errors import SonocadWarning

_python_showwarning = warnings.showwarning


def fmt(v) -> str:
    """A figure for the terminal: 3 decimals, or n/a where the data do not define it."""
    return "n/a" if v is None or v != v else f"{v:.3f}"


def print_metrics(m: dict, where: str) -> None:
    if "auc_ci" in m:
        lo, hi = m["auc_ci"]
        print(f"{where}: n={m['n']} {m['n_per_class']}  AUC {fmt(m['auc'])} (95% CI {fmt(lo)}-{fmt(hi)})  "
              f"sensitivity {fmt(m['sensitivity'])}  specificity {fmt(m['specificity'])}  "
              f"balanced accuracy {fmt(m['balanced_accuracy'])}  (threshold {m['threshold']:.2f})")
        hs = m.get("operating_points", {}).get("high_sensitivity", {})
        if "promised_sensitivity" in hs:
            print(f"  high-sensitivity point (threshold {hs['threshold']:.3f}): sensitivity {fmt(hs['sensitivity'])} "
                  f"(95% CI {fmt(hs['sensitivity_ci'][0])}-{fmt(hs['sensitivity_ci'][1])}), promised >= "
                  f"{fmt(hs['promised_sensitivity'])}: {promise_verdict(hs)}; specificity "
                  f"{fmt(hs['specificity'])}")
    else:
        print(f"{where}: n={m['n']}  macro AUC {fmt(m['auc'])}  accuracy {fmt(m['accuracy'])}  "
              f"balanced accuracy {fmt(m['balanced_accuracy'])}")


def promise_verdict(op: dict) -> str:
    """'kept', or why not: a miss within chance of so few positives, or data that refute the promise."""
    if op["promise_kept"] is None:
        return "not checkable (no positive cases)"
    if op["promise_kept"]:
        return "kept"
    p = op.get("promise_p")
    if p is None:
        return "NOT kept"
    return f"NOT kept ({'refuted' if p < 0.05 else 'a miss within chance'}: p = {p:.2g} were it true)"


def warn_bad(bad: list[str]) -> None:
    if bad:
        print(f"warning: skipped {len(bad)} bad image(s):", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)


def print_explanation(m: dict) -> None:
    e = m.get("explanation")
    if e:
        print(f"where the model looked (Grad-CAM, {e['n']} images with lesion masks): pointing game "
              f"{fmt(e['pointing_game'])} (95% CI {fmt(e['pointing_game_ci'][0])}-{fmt(e['pointing_game_ci'][1])}, "
              f"chance {fmt(e['pointing_game_chance'])}), energy in the mask {fmt(e['energy_in_mask'])} "
              f"(95% CI {fmt(e['energy_in_mask_ci'][0])}-{fmt(e['energy_in_mask_ci'][1])}, chance "
              f"{fmt(e['energy_in_mask_chance'])})")
    g = m.get("segmentation")
    if g:
        print(f"lesion masks ({g['n']} images with masks): Dice {fmt(g['dice_mean'])} (95% CI {fmt(g['dice_ci'][0])}-"
              f"{fmt(g['dice_ci'][1])}), median {fmt(g['dice_median'])}")


def print_fold_points(m: dict) -> None:
    for name, op in m.get("fold_operating_points", {}).items():
        if name != "default":
            promise = (f", promised >= {op['promised_sensitivity']:.3f}: {promise_verdict(op)}"
                       if "promised_sensitivity" in op else "")
            print(f"  at each fold's {name} threshold (chosen on its validation data): sensitivity "
                  f"{op['sensitivity']:.3f}, specificity {op['specificity']:.3f}{promise}")


def show_warning(message, category, *args, **kwargs) -> None:
    """warnings.showwarning for the command line: sonocad's warnings as one line each."""
    if issubclass(category, SonocadWarning):
        print(f"sonocad: warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, *args, **kwargs)
