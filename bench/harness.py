"""What every benchmark in bench/ shares: its arguments (`--smoke`, `--json`), the machine it ran on, how busy that
machine was, where its images come from, and one way to end: a `result NAME: key=value ...` line, and with
`--json OUT` every figure in a file.

    bench = Bench.start("predict_folder", __doc__, argv, add_arguments)   # parses, prints the machine
    ...
    return bench.finish({"images_per_s": 55.0}, details={...}, headline="...")

`--smoke` runs a benchmark in seconds on a few small synthetic phantoms (`sonocad.data.synth`), so that the test
suite can check that it still runs (tests/test_bench_smoke.py); its figures then say nothing about speed or
accuracy. Benchmarks use BUSI where ../shared holds it, and say so when they use phantoms instead.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BUSI = SHARED / "busi" / "Dataset_BUSI_with_GT"
BUSBRA = SHARED / "busbra" / "BUSBRA"
CLASSES = ["benign", "malignant"]
SITES = {"busi": "busi/Dataset_BUSI_with_GT", "busbra": "busbra/BUSBRA"}    # the two sites, under ../shared/data
SMOKE_SIZE = 64           # px of the smoke runs' phantoms and models
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))      # run from a checkout without installing


def other_site(site: str) -> str:
    """The site that is not `site` (leave-one-site-out)."""
    return next(s for s in SITES if s != site)


# -- test-time augmentation choices ----------------------------------------------------------------
TTA_CHOICES = ("none", "mirror", "full")
TTA_HELP = ("test-time augmentation choices: none = the image alone, mirror = and its mirror image, full = and "
            "each of the run's zooms, mirrored too (a run's default)")


def tta_setting(choice: str, zooms) -> dict:
    """The run config's fields for a TTA_CHOICES entry, for a run whose zooms are `zooms`."""
    return {"tta": choice != "none", "tta_zooms": list(zooms) if choice == "full" else []}


# -- the machine -----------------------------------------------------------------------------------
def machine() -> dict:
    """The CPU (lscpu's model name, family and model), its cores, the GPU if any, Python and torch."""
    cpu = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": cpu.get("Model name") or platform.processor() or platform.machine(),
            "cpu_family": cpu.get("CPU family"), "cpu_model": cpu.get("Model"), "cores": os.cpu_count(),
            "python": platform.python_version()}
    import torch

    info.update(torch=torch.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def describe(m: dict) -> str:
    family = f" (family {m['cpu_family']} model {m['cpu_model']})" if m.get("cpu_family") else ""
    return (f"{m['cpu']}{family}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; Python {m['python']}, torch "
            f"{m['torch']} ({m['threads']} threads)")


class CpuMeter:
    """How much of the CPUs other processes (and the hypervisor, as steal time) took while we ran."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        import resource

        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz
        steal = v[7] / hz if len(v) > 7 else 0.0
        return time.perf_counter(), busy, steal, own

    def report(self) -> dict:
        end = self._read()
        if self.start is None or end is None:
            return {"other_processes": None, "steal": None, "loadavg": list(os.getloadavg())}
        cap = (end[0] - self.start[0]) * (os.cpu_count() or 1)
        other = max(0.0, (end[1] - self.start[1]) - (end[3] - self.start[3])) / cap
        return {"other_processes": other, "steal": (end[2] - self.start[2]) / cap, "loadavg": list(os.getloadavg())}

    @classmethod
    def busy_now(cls, seconds: float = 1.0) -> str:
        """One line on what other processes use right now (sampled for `seconds`)."""
        m = cls()
        time.sleep(seconds)
        r = m.report()
        if r["other_processes"] is None:
            return f"load average {r['loadavg'][0]:.2f}"
        note = "  <- not idle: figures will be too low" if r["other_processes"] > 0.05 else ""
        return f"other processes use {100 * r['other_processes']:.0f}% of the CPUs right now{note}"

    @staticmethod
    def describe(r: dict) -> str:
        if r["other_processes"] is None:
            return f"machine load: unknown (no /proc/stat); load average {r['loadavg'][0]:.2f}"
        s = (f"machine load during the run: other processes {100 * r['other_processes']:.0f}% of the CPUs, "
             f"hypervisor steal {100 * r['steal']:.0f}%")
        if r["other_processes"] > 0.05 or r["steal"] > 0.05:
            s += "\nWARNING: the machine was not idle; these figures are not reliable, re-measure on an idle machine"
        return s


# -- one benchmark run -----------------------------------------------------------------------------
class Bench:
    """One run of a benchmark: its arguments, machine, load meter and temporary folder, and its ending."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args, self.smoke = name, args, bool(getattr(args, "smoke", False))
        self.machine = machine()
        self._tmp, self._tmpdir, self._threads = contextlib.ExitStack(), None, None
        self.meter = CpuMeter()

    @classmethod
    def start(cls, name: str, doc: str, argv=None, add_arguments=None, extra: str | None = None) -> "Bench":
        """Parse `argv` (the benchmark's own options, from `add_arguments(parser)`, and the shared ones), check
        sonocad's optional part `extra` when the benchmark needs one, print the machine and whether it is busy;
        the returned Bench's `args` holds the options."""
        p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if add_arguments:
            add_arguments(p)
        p.add_argument("--smoke", action="store_true", help="run in seconds on a few synthetic phantoms, to check "
                       "that the benchmark runs (its figures then mean nothing)")
        p.add_argument("--json", metavar="OUT", help="also write every figure, the machine and the load as JSON")
        args = p.parse_args(argv)
        if extra:
            from sonocad.errors import MissingExtra
            from sonocad.runtime.extras import require

            try:
                require(extra, f"bench/{name}.py")
            except MissingExtra as e:
                raise SystemExit(str(e)) from None
        bench = cls(name, args)
        print(f"{name}: {describe(bench.machine)}", flush=True)
        if bench.smoke:
            import torch

            # one thread: a smoke run beside other work is not slowed tenfold by a waiting thread (docs/performance.md)
            bench._threads = torch.get_num_threads()
            torch.set_num_threads(1)
            print("smoke run: a few synthetic phantoms; the figures below only show that the benchmark runs")
        else:
            print(f"machine check: {CpuMeter.busy_now()}", flush=True)
        return bench

    def tmp(self) -> Path:
        """A temporary folder, removed when the benchmark finishes."""
        if self._tmpdir is None:
            self._tmpdir = Path(self._tmp.enter_context(tempfile.TemporaryDirectory(prefix=f"sonocad-{self.name}-")))
        return self._tmpdir

    def finish(self, summary: dict, details: dict | None = None, headline: str | None = None) -> int:
        """Print the load, `result NAME: key=value ...` (the scalar `summary`), write --json (summary, details,
        machine, arguments, load), print `headline` last; clean up. Returns 0, the benchmark's exit code."""
        load = self.meter.report()
        print(CpuMeter.describe(load))
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        print(f"result {self.name}{' (smoke)' if self.smoke else ''}: {line}")
        if self.args.json:
            record = {"benchmark": self.name, "smoke": self.smoke, "summary": summary, "details": details or {},
                      "machine": self.machine, "load": load, "args": vars(self.args)}
            Path(self.args.json).write_text(json.dumps(record, indent=1, default=str))
            print(f"figures written to {self.args.json}")
        self._tmp.close()
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
        if headline:
            print(headline)
        return 0


# -- images ----------------------------------------------------------------------------------------
def phantoms(folder: Path, n: int = 24, size: int = SMOKE_SIZE, seed: int = 0) -> Path:
    """`n` synthetic B-mode phantoms in BUSI's class-folder layout (benign, malignant; with masks)."""
    from sonocad.data.synth import write_phantom_set

    if not (folder / "malignant").is_dir():
        write_phantom_set(folder, n=n, seed=seed, size=size)
    return folder


def image_source(bench: Bench, n: int = 240, size: int = 256) -> tuple[Path, str]:
    """BUSI (benign and malignant) where ../shared holds it and this is no smoke run; else `n` phantoms of
    `size` px (smoke: 24 of SMOKE_SIZE px) in the benchmark's temporary folder. Returns (folder, what)."""
    if BUSI.is_dir() and not bench.smoke:
        return BUSI, "BUSI benign+malignant"
    if not bench.smoke:
        print(f"note: {BUSI} not found; using synthetic phantoms (sonocad.data.synth) instead of BUSI")
    n, size = (24, SMOKE_SIZE) if bench.smoke else (n, size)
    return phantoms(bench.tmp() / "phantoms", n, size), f"synthetic phantoms, {size} px"


def copy_images(bench: Bench, folder: Path, n: int) -> str:
    """`n` image files in `folder` (new), copied from `image_source` and cycled, under new names."""
    import shutil

    from sonocad.data import discover

    source, what = image_source(bench, 200, 500)
    paths = [s.path for s in discover(source, CLASSES)]
    folder.mkdir(parents=True)
    for i in range(n):
        src = Path(paths[i % len(paths)])
        shutil.copyfile(src, folder / f"scan-{i:05d}{src.suffix}")
    return what


def tiny_run(folder: Path, data: Path | None = None, **overrides) -> Path:
    """A small trained run for smoke runs (SMOKE_SIZE px, one epoch per phase, no duplicate search), on
    `data` or on phantoms of its own; reused when `folder` holds it already."""
    from sonocad.io.rundir import kind
    from sonocad.workflows.train import fit

    run = folder / "run"
    if kind(run) != "train":
        data = data or phantoms(folder / "phantoms")
        fit(data, run, **{**SMOKE_TRAINING, **overrides}, classes=CLASSES, seed=0, progress=False)
    return run


def add_run_argument(p: argparse.ArgumentParser) -> None:
    """RUN, a finished run directory, for the benchmarks that time one; --smoke trains a tiny one without it."""
    p.add_argument("run", nargs="?", help="a sonocad run directory (e.g. runs/busi from `sonocad train`); "
                   "--smoke trains a tiny one when left out")


def run_for(bench: Bench) -> str:
    """The benchmark's RUN argument (a smoke run without one trains a tiny run in the temporary folder), with
    glibc's allocator tuned as the sonocad command tunes it before it loads a run."""
    from sonocad.runtime.allocator import tune_allocator

    tune_allocator()
    if bench.args.run:
        return bench.args.run
    if not bench.smoke:
        raise SystemExit(f"bench/{bench.name}.py: give a run directory (or --smoke)")
    return str(tiny_run(bench.tmp()))


SMOKE_TRAINING = {"img_size": SMOKE_SIZE, "head_epochs": 1, "finetune_epochs": 1, "batch_size": 8, "dedup": False}


def fake_sites(folder: Path, n: int = 32, size: int = SMOKE_SIZE) -> Path:
    """A stand-in for ../shared/data with two small sites of phantoms in the real layouts:
    busi/Dataset_BUSI_with_GT (class folders) and busbra/BUSBRA (bus_data.csv with ID, Case, Pathology, BIRADS;
    5-fold-cv.csv with kFold 1 and 2; Images/, Masks/; two views per patient). Returns the stand-in's root."""
    import shutil

    from sonocad.data import discover

    root = folder / "shared-data"
    busbra = root / SITES["busbra"]
    if (busbra / "5-fold-cv.csv").is_file():
        return root
    phantoms(root / SITES["busi"], n, size, seed=1)
    source = phantoms(folder / "busbra-phantoms", n, size, seed=2)
    (busbra / "Images").mkdir(parents=True)
    (busbra / "Masks").mkdir()
    rows = []
    for i, s in enumerate(discover(source, CLASSES)):
        image_id = f"bus_{i // 2:04d}-{'lr'[i % 2]}"
        shutil.copyfile(s.path, busbra / "Images" / f"{image_id}.png")
        shutil.copyfile(s.masks[0], busbra / "Masks" / f"{image_id.replace('bus_', 'mask_')}.png")
        rows.append({"ID": image_id, "Case": i // 2, "Pathology": s.label,
                     "BIRADS": 5 if s.label == "malignant" else 3, "kFold": 1 + (i // 2) % 2})
    for name, fields in (("bus_data.csv", ["ID", "Case", "Pathology", "BIRADS"]), ("5-fold-cv.csv", ["ID", "kFold"])):
        with open(busbra / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return root
