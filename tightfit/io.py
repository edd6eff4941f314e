"""Atomic outputs: a job that fails or is interrupted leaves no half-written file or folder behind."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, OutputWriteError


def check_target(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another output path or pass --force to replace it.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside PATH; on success it is renamed onto PATH, on any failure removed."""
    path = Path(path)
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    prefix = f".{path.name}.partial-{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException as e:
        _remove(tmp)
        code = _write_errno(e, path.parent)
        if code is None or isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(f"could not write {path}: {os.strerror(code)} (errno {code}). Nothing was left "
                               "behind; free space (or choose another output path) and run it again.") from e


def _remove_stale_partials(path: Path) -> None:
    """Temporary outputs of earlier runs for the same PATH whose process is gone (killed mid-write): removed, so a
    rerun starts clean. A live process's temporary output is left alone."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name[len(f".{path.name}.partial-"):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        _remove(stale)


WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO)


def _write_errno(e: BaseException, directory: Path) -> int | None:
    """The errno of a failed write: an OSError's, one a library reports in its message (safetensors raises
    its own error type, 'I/O error: No space left on device (os error 28)'), or, for a short write that lost
    its errno (numpy's tofile under gguf's writer: '4096 requested and 256 written'), ENOSPC where the disk
    has no room left and EIO otherwise."""
    import re

    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code is None and isinstance(e, OSError) and re.search(r"\d+ requested and \d+ written", str(e)):
        try:
            st = os.statvfs(directory)
            code = errno.ENOSPC if st.f_bavail * st.f_frsize < (1 << 20) else errno.EIO
        except OSError:
            code = errno.EIO
    return code if code in WRITE_ERRNOS else None


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file or folder onto PATH, replacing what was there."""
    os.chmod(tmp, 0o755 if tmp.is_dir() else 0o644)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old) if not path.is_dir() else path.rename(old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (a temporary file beside it, then a rename)."""
    import json

    path = Path(path)
    with atomic_path(path, directory=False, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def release_freed_memory_eagerly() -> None:
    """Serve large allocations from mmap (glibc), so memory a finished layer frees goes back to the OS.

    glibc raises its mmap threshold after large frees and then reuses a fragmented heap, so a job that frees
    one layer's tensors and allocates the next one's keeps growing its resident size. Fixing the threshold at
    1 MiB (M_MMAP_THRESHOLD) keeps the peak near one layer. A no-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def return_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim) once a build that allocated and freed
    many small tensors is over: measured here, 28 MB of a streamed load's resident size was such free heap.
    A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'40MB' -> 40_000_000, '1.5GiB' -> 1610612736, '1000' -> 1000 bytes."""
    import re

    from .errors import TightfitError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise TightfitError(f"cannot read the size {text!r}: expected a number with an optional unit, e.g. 40MB, "
                            "1.5GiB or 2000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_ST_DTYPES = None


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write TENSORS to PATH in the safetensors format, streaming each tensor's bytes from its own storage.

    safetensors.torch.save_file first turns every tensor into a bytes copy and then writes them, so writing a
    5.2 GB artifact held 10.4 GB at its peak (measured: a 7B-shape quantize peaked at 11.5 GB). Here the header
    is computed from shapes and dtypes, and each tensor is written from its storage, so writing costs at most
    one tensor's contiguous copy. Tensors are laid out as save_file lays them (by alignment, then name); the
    safetensors library reads the file back (the tests check it).
    """
    import json

    import torch

    global _ST_DTYPES
    if _ST_DTYPES is None:
        _ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
                      torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as save_file makes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            t = t.contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(t.numpy()))
