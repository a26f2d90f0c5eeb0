"""What the benchmarks in bench/ share: the machine they ran on, the library versions, peak memory.

(The benchmark issue grows this into the harness: warm-ups, synchronisation, tables and plots.)
"""
import importlib.metadata
import os
import platform
import resource
import shlex
import sys

from . import runtime

MIB = 2**20


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def versions(*dists: str) -> dict[str, str]:
    """{distribution: version} ("absent" where not installed)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def machine(note: str = "") -> str:
    """One line: architecture, cores (with `note`), RAM and GPU, e.g. "x86_64, 2 cores, RAM 23.5 GB, no GPU"."""
    profile = runtime.detect_profile()
    cores = f"{os.cpu_count()} cores" + (f" ({note})" if note else "")
    return f"{platform.machine()}, {cores}, RAM {profile.ram_gb:.1f} GB, {runtime.describe(profile).split(' | ')[1]}"


def command_line(script: str, argv=None) -> str:
    """The command that reproduces this run: the environment switches that matter, then `python script args`."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("HF_HUB_OFFLINE", "HELPERS_TINY") if os.environ.get(k))
    args = sys.argv[1:] if argv is None else argv
    return " ".join(filter(None, [env, "python", shlex.join([sys.argv[0] if argv is None else script, *args])]))
