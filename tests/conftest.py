"""Shared fixtures: tiny synthetic datasets, the shared real data (skipped with a reason when absent)."""
import os
import signal
import tempfile
import time
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and in the processes they start), or OpenMP's
    # waiting threads fight over the cores and every test slows down several times
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import pytest

# keep the tests' dedup cache out of the user's ~/.cache
os.environ.setdefault("SONOCAD_CACHE", tempfile.mkdtemp(prefix="sonocad-test-cache-"))

from sonocad.data.synth import write_phantom_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUSI = SHARED / "busi" / "Dataset_BUSI_with_GT"
BUSBRA = SHARED / "busbra" / "BUSBRA"


# The test files that take longest on 2 cores, longest first (pytest --durations, AMD EPYC, 0.2.0). `make test`
# hands whole files to its two workers; starting with the long ones and keeping the short ones for the end lets
# both workers finish together (longest-first scheduling). Only the order depends on this list, never a result.
LONGEST_FILES = ("test_bench_smoke.py", "test_demo.py", "test_reliability.py", "test_adapt.py",
                 "test_distributed.py", "test_pipeline.py", "test_export.py", "test_cv.py", "test_resume.py",
                 "test_readme.py", "test_calibrate.py", "test_segment.py", "test_cli.py", "test_gpu_check.py",
                 "test_dedup.py", "test_cache.py", "test_dicom.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: a file's own order is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` in the collection's order (longest files first), and a worker takes its next file only
    when it is down to its last test, so that no file waits queued behind a long one while the other worker idles
    (xdist's default takes the next file with two tests left, and orders files by their number of tests)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    if not all(hasattr(LoadFileScheduling, n) for n in ("_reschedule", "_pending_of", "_assign_work_unit")):
        return None         # another xdist than the lock's (3.8): its own scheduling, in the collection's order

    class LongestFirst(LoadFileScheduling):
        def _reschedule(self, node):
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:     # its last test waits for what comes next
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return LongestFirst(config, log)


def one_line_error(capsys, argv) -> str:
    """Run the CLI with `argv`: it must fail with exit code 2 and one line on stderr, which is returned."""
    from sonocad.cli.main import main

    capsys.readouterr()                          # what earlier commands printed is not this one's
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def can_fork() -> bool:
    """Whether a process the tests start may be a fork of this one, which spares the Python and torch start-up
    (seconds each): only where torch runs one thread (the workers of `make test`), since a fork of a process
    whose OpenMP threads have run hangs."""
    import torch

    return torch.get_num_threads() == 1


class Sonocad:
    """`python -m sonocad ARGV` started in the background, for tests that kill or interrupt it: Popen's `pid`,
    `poll`, `wait`, `send_signal`, `returncode` and `stderr` (a file to read). A fork of this process where
    `can_fork()`, else a new interpreter."""

    def __init__(self, argv):
        import subprocess
        import sys

        argv = [str(a) for a in argv]
        self.returncode = None
        if not can_fork():
            # a shell that starts the tests in the background makes them ignore SIGINT, and Python then never
            # raises KeyboardInterrupt: give the child the default disposition back
            self._popen = subprocess.Popen([sys.executable, "-m", "sonocad", *argv], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True,
                                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            self.pid, self.stderr = self._popen.pid, self._popen.stderr
            return
        self._popen = None
        err_fd, err_path = tempfile.mkstemp(prefix="sonocad-stderr-")
        self.pid = os.fork()
        if self.pid == 0:
            self._child(argv, err_fd)
        os.close(err_fd)                         # the child writes through its own copy
        self.stderr = open(err_path)
        os.unlink(err_path)

    @staticmethod
    def _child(argv, err_fd):
        import sys
        import traceback

        code = 1
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(err_fd, 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            from sonocad.cli.main import main

            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def poll(self):
        if self._popen:
            self.returncode = self._popen.poll()
        elif self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = time.time() + (timeout or 1e9)
        while self.poll() is None:
            if time.time() > deadline:
                raise TimeoutError(f"sonocad (pid {self.pid}) still running after {timeout} s")
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """48 synthetic B-mode phantoms of 64 px in the BUSI class-folder layout."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(out, n=48, seed=3, size=64)
    return out


@pytest.fixture(scope="session")
def tiny_run(phantoms, tmp_path_factory) -> Path:
    """A tiny trained run (64 px, a couple of epochs) shared by evaluate/predict tests."""
    from sonocad.cli.main import main

    run = tmp_path_factory.mktemp("run") / "tiny"
    rc = main(["train", str(phantoms), "--out", str(run), "--img-size", "64", "--head-epochs", "3",
               "--finetune-epochs", "1", "--batch-size", "8", "--seed", "0", "--quiet"])
    assert rc == 0
    return run
