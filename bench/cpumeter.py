"""How busy the machine was while a benchmark ran (no torch import: the Keras worker uses it too)."""
from __future__ import annotations

import os
import time


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
