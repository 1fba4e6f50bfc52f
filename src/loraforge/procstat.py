"""This process's resident memory and the machine's load, as `loraforge bench` and `loraforge compare`
report them (each measured system runs in a process of its own, so its peak is its own)."""

from __future__ import annotations

import os
import resource
from pathlib import Path


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


def available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, or less where a cgroup limit is lower.
    None where neither /proc/meminfo nor a cgroup says."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            room = int(limit) - usage
            avail = room if avail is None else min(avail, room)
    return avail
