"""What a committed report names about where it was measured: the commit and the machine.

Shared by the bench tool (docs/benchmarks.md) and the conformance suite's report
(docs/conformance.md); standard library only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path


def commit() -> str:
    """The commit measured: its short hash, `-dirty` with uncommitted changes."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"],
                               cwd=Path(__file__).parent, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "an unknown commit (no git)"
    return f"commit {found.stdout.strip()}" if found.returncode == 0 else "an unknown commit"


def machine() -> str:
    """One line naming the machine: CPU model, cores, memory, OS, Python, torch."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    try:
        from importlib.metadata import version

        torch = f", torch {version('torch')}"
    except Exception:  # no torch in this environment: the line without it
        torch = ""
    # The machine's cores, not this process's affinity (the bench pins itself to a subset).
    return (f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}{torch}")
