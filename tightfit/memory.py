"""What this machine can hold, checked before a verb starts: a job that cannot fit says so with the numbers
and the flag that would make it fit, instead of being killed by the kernel's OOM killer half-way."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MemoryBudgetError

ENV = "TIGHTFIT_MEMORY_LIMIT"  # e.g. 8GB: plan as if the machine had only this much free (shared machines)


def _cgroup_free() -> int | None:
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) > 1 << 60:
                return None
            return int(text) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int:
    """Memory a new allocation can take now: MemAvailable, the cgroup's headroom, and $TIGHTFIT_MEMORY_LIMIT."""
    from .io import parse_size

    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = _cgroup_free()
    candidates = [v for v in (free, cg) if v is not None]
    if os.environ.get(ENV):
        candidates.append(parse_size(os.environ[ENV]))
    return min(candidates) if candidates else 1 << 62


def require(needed: int, what: str, hint: str) -> None:
    """Raise MemoryBudgetError when `needed` bytes exceed what is available."""
    have = available_bytes()
    if needed > have:
        raise MemoryBudgetError(f"{what} needs about {needed / 1e9:.2f} GB of memory, but {have / 1e9:.2f} GB is "
                                f"available. {hint}")
