"""This process's resident memory and the machine's load, as `loraforge bench` and `loraforge compare`
report them (each measured system runs in a process of its own, so its peak is its own)."""

from __future__ import annotations

import os
import resource


def rss_bytes() -> dict[str, int]:
    """Current and peak resident set size of this process (VmRSS / VmHWM), in bytes. Where /proc is
    missing, the peak is getrusage's ru_maxrss and the current size 0."""
    vals = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    peak = vals.get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss": vals.get("VmRSS", 0), "peak": peak}


def reset_peak_rss() -> bool:
    """Make VmHWM restart from the current RSS (Linux clear_refs 5), to measure one phase's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
