"""Devices as data: the catalog (`catalog.json`, each figure with its source) and measured profiles of this
machine (written by `tightfit probe`). Only reads; the probe, which times the runtime, lives above it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TightfitError

CATALOG = Path(__file__).with_name("catalog.json")


class HardwareError(TightfitError, ValueError):
    """An unknown device name or an unreadable profile."""


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    kind: str  # gpu, npu, soc, cpu
    memory: float  # bytes
    bandwidth: float  # bytes/s, peak
    flops: dict  # dtype -> dense FLOP/s
    link: float = 0.0  # device-to-device bytes/s (0: none)
    host_link: float = 0.0  # device <-> host memory bytes/s
    disk: float = 2e9  # bytes/s read from disk, for weights streamed from it
    host_memory: float = 0.0  # bytes of host RAM beside the device (0: the device's memory is the host's)
    efficiency: dict = field(default_factory=lambda: {"bandwidth": 0.8, "compute": 0.5, "overhead_s": 0.0})
    source: str = ""
    verified: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def profile_path() -> Path:
    return Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit")) / "profile.json"


def catalog() -> dict[str, Device]:
    data = json.loads(CATALOG.read_text())["devices"]
    return {k: Device(key=k, **v) for k, v in data.items()}


def get_device(name: str) -> Device:
    """A catalog entry, or `this` (the profile `tightfit probe` saved)."""
    if name == "this":
        p = profile_path()
        if not p.is_file():
            raise HardwareError(f"no profile of this machine at {p}: run `tightfit probe` first, or name a device "
                                "from `tightfit hardware`.")
        try:
            return Device(**json.loads(p.read_text())["device"])
        except (ValueError, TypeError, KeyError) as e:
            raise HardwareError(f"{p} is not a tightfit profile ({e}); run `tightfit probe` again.") from e
    devices = catalog()
    if name not in devices:
        close = [k for k in devices if name.lower().replace(" ", "-") in k]
        raise HardwareError(f"unknown hardware {name!r}: choose one of {', '.join(devices)}, or 'this' (after "
                            f"`tightfit probe`)" + (f"; did you mean {close[0]}?" if close else ""))
    return devices[name]
