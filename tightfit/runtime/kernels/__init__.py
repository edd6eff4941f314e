"""tightfit's own CPU kernels, compiled on first use with the machine's C++ compiler into
~/.cache/tightfit/kernels and loaded with ctypes.

- `library()` (qgemm.cpp): low-bit weights x int8 activations with AVX-512 VNNI, the runtime's decode step; on
  CPUs without AVX-512 the same source compiles onto AVX2 + FMA + F16C (avx2_compat.h; the first build takes a
  few minutes there). Where there is no compiler or the CPU has neither, it returns None and the runtime uses
  torch's int4 kernel instead. TIGHTFIT_KERNEL=torch forces that fallback.
- `quant_library()` (quant.cpp): GPTQ's column loop, the clip search of group parameters and the
  sensitivities' Fisher-weighted rounding loss, portable C++.
  Without a compiler (or with TIGHTFIT_KERNEL=torch) it returns None and they run in torch.
- `gram_library()` (gram.cpp): H += X^T X for bf16 activations on AMX tiles with fp32 sums (the calibration's
  Hessians), where the CPU has AMX and Linux grants it; `gram_avx_library()` (gram_avx.cpp) the same sums with
  AVX-512 BF16 dot products where there is no AMX (AMD Zen 4/5); `hessian_library()` picks one, else None and
  the Hessians are fp32 GEMMs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("qgemm.cpp")
QUANT_SOURCE = Path(__file__).with_name("quant.cpp")
GRAM_SOURCE = Path(__file__).with_name("gram.cpp")
GRAM_AVX_SOURCE = Path(__file__).with_name("gram_avx.cpp")
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "f16c")
# without AVX-512 the same kernel compiles onto AVX2 (avx2_compat.h: each 512-bit vector as two 256-bit halves)
AVX2_FLAGS = ("avx2", "fma", "f16c")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once (compute_dtype asks on every error product)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, Arm
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm).
    Without it torch's bf16 GEMMs fall back to converting loops: on an AVX2-only AMD EPYC they ran at 0.8-22
    GFLOP/s against 90-156 for fp32, so work that would take bf16 for speed takes fp32 there.
    TIGHTFIT_BF16=0/1 overrides the detection."""
    env = os.environ.get("TIGHTFIT_BF16")
    if env in ("0", "1"):
        return env == "1"
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_dtype():
    """The dtype for large float products where bf16's precision is enough: bf16 where the CPU has it in
    hardware, else fp32 (faster there, and exact)."""
    import torch

    return torch.bfloat16 if native_bf16() else torch.float32


def cache_dir() -> Path:
    return Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit")) / "kernels"


def _compile(cxx: str, flags: list[str], link: list[str], so: Path, source: Path = SOURCE) -> bool:
    """Build the library into `so` (in a temporary folder, then renamed: two processes compiling at once each
    publish a whole file, and a half-written library is never loaded)."""
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        out, obj = Path(tmp) / so.name, Path(tmp) / f"{source.stem}.o"
        r = subprocess.run([cxx, *flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True,
                           check=False)
        if r.returncode == 0:
            r = subprocess.run([cxx, str(obj), "-o", str(out), *link], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log.warning("tightfit kernel %s did not compile (%s); using torch instead", source.name, r.stderr[-500:])
            return False
        os.replace(out, so)
    return True


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _load(cxx: str, source: Path, flags: list[str]) -> ctypes.CDLL | None:
    """Compile `source` once per (source, compiler, flags, CPU) into the cache and load it."""
    link = ["-shared", "-fopenmp", "-lm"]
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers +
                         " ".join([cxx, *flags, *link, *sorted(cpu_flags())]).encode())
    so = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    for _ in range(2):
        if not so.exists() and not _compile(cxx, flags, link, so, source):
            return None
        try:
            return ctypes.CDLL(str(so))
        except OSError as e:  # a damaged cached library (a truncated copy, another machine's): build it again
            log.warning("tightfit kernel cache %s could not be loaded (%s); rebuilding it", so, e)
            so.unlink(missing_ok=True)
    return None


def _library(source: Path, flags: list[str], signatures: dict, what: str) -> ctypes.CDLL | None:
    """`source` compiled and loaded with each function's (argtypes, restype), or None (TIGHTFIT_KERNEL=torch,
    no compiler, a failed build; `what` names the fallback in the log)."""
    if os.environ.get("TIGHTFIT_KERNEL", "").lower() == "torch":
        return None
    cxx = _cxx()
    if cxx is None:
        log.info("tightfit kernel %s off: no C++ compiler found; %s", source.name, what)
        return None
    lib = _load(cxx, source, flags)
    if lib is None:
        return None
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


@lru_cache(maxsize=1)
def quant_library() -> ctypes.CDLL | None:
    """quant.cpp compiled, or None (no compiler, or TIGHTFIT_KERNEL=torch): GPTQ then loops in torch."""
    # no -ffast-math, no FMA contraction: every operation rounds as torch's do (bit-equal results)
    return _library(QUANT_SOURCE, ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-std=c++17"],
                    {"gptq_block": ([_p] * 6 + [_i, _p] + [_i] * 4 + [_p, _p, _i], None),
                     "search_clips": ([_p, _i, _i, _i, _p, _p, _i, _p, _f, _f, _p, _i, _p, _i], None),
                     "fisher_loss": ([_p, _p, ctypes.c_int64, _i, _p, _p, _f, _f, _p, _i, _i], ctypes.c_double)},
                    "GPTQ's column loop and the clip search run in torch")


@lru_cache(maxsize=1)
def gram_library() -> ctypes.CDLL | None:
    """gram.cpp compiled and checked against an fp32 GEMM, or None (no AMX, no compiler, TIGHTFIT_KERNEL=torch,
    or the kernel disagreed: then logged)."""
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return None
    lib = _library(GRAM_SOURCE, ["-O2", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-fopenmp", "-fPIC", "-std=c++17"],
                   {"gram_init": ([], _i), "gram_bf16": ([_p, _p, _i, _i, _p, _i], None)},
                   "the Hessians are fp32 GEMMs")
    if lib is None:
        return None
    if lib.gram_init() != 0:
        log.info("AMX Hessian kernel off: Linux did not grant this process AMX tiles")
        return None
    return _agrees(lib, "AMX", 96)


def _agrees(lib: ctypes.CDLL, name: str, tokens: int) -> ctypes.CDLL | None:
    """lib where its Hessian of random bf16 inputs equals an fp32 GEMM's, else None (logged)."""
    import torch

    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    H = torch.zeros(64, 64)
    gram_into(lib, H, x)
    ref = x.float().T @ x.float()
    if not torch.allclose(H.triu(), ref.triu(), rtol=1e-5, atol=1e-4):
        log.warning("%s Hessian kernel disagrees with an fp32 GEMM here (max diff %.3g); not used", name,
                    float((H.triu() - ref.triu()).abs().max()))
        return None
    return lib


@lru_cache(maxsize=1)
def gram_avx_library() -> ctypes.CDLL | None:
    """gram_avx.cpp (AVX-512 BF16 dot products, fp32 sums) compiled and checked against an fp32 GEMM, or None
    (no avx512_bf16, no compiler, TIGHTFIT_KERNEL=torch, or the kernel disagreed: then logged). For CPUs without
    AMX; gram_library() is preferred where both run."""
    if not {"avx512f", "avx512_bf16"} <= cpu_flags():
        return None
    lib = _library(GRAM_AVX_SOURCE, ["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp", "-fPIC", "-std=c++17"],
                   {"gram_bf16_avx": ([_p, _i, _i, _p, _i], None)}, "the Hessians are fp32 GEMMs")
    if lib is None:
        return None
    return _agrees(lib, "AVX-512 BF16", 98)


def hessian_library() -> ctypes.CDLL | None:
    """The bf16 Hessian kernel this CPU runs: AMX tiles, else AVX-512 BF16, else None (fp32 GEMMs)."""
    return gram_library() or gram_avx_library()


def gram_into(lib: ctypes.CDLL, H, x) -> None:
    """H [n, n] fp32 += x^T x (upper triangle and diagonal blocks only) for x [T, n] bf16, n a multiple of 32."""
    import torch

    T, n = x.shape
    if hasattr(lib, "gram_bf16_avx"):  # gram_avx.cpp's layout: token pairs only
        if T % 2:
            x = torch.cat([x, x.new_zeros(1, n)])  # a zero token adds nothing
            T += 1
        XP = x.reshape(T // 2, 2, n).transpose(1, 2).contiguous()
        lib.gram_bf16_avx(XP.data_ptr(), n, T, H.data_ptr(), torch.get_num_threads())
        return
    if T % 32:
        x = torch.cat([x, x.new_zeros(32 - T % 32, n)])  # zero tokens add nothing
        T = x.shape[0]
    XT = x.T.contiguous()
    XP = x.reshape(T // 2, 2, n).transpose(1, 2).contiguous()
    lib.gram_bf16(XT.data_ptr(), XP.data_ptr(), n, T, H.data_ptr(), torch.get_num_threads())


@lru_cache(maxsize=1)
def _kernel_form() -> str | None:
    """The form of qgemm.cpp this CPU takes: "avx512-vnni", "avx2" (also where TIGHTFIT_KERNEL=avx2 asks for it
    on an AVX-512 CPU, to test it there), or None (neither; logged)."""
    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    if not missing and os.environ.get("TIGHTFIT_KERNEL", "").lower() != "avx2":
        return "avx512-vnni"
    if set(AVX2_FLAGS) <= cpu_flags():
        return "avx2"
    log.info("tightfit kernel off: the CPU lacks %s (and AVX2 + FMA + F16C); using torch's int4 kernel",
             ", ".join(missing))
    return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with the reason logged) where it cannot run here."""
    flags = qgemm_flags()
    if flags is None:
        return None
    return _library(SOURCE, flags,
                    {"linear": ([_p, _i, _i, _p, _p, _p, _i, _i, _p, _i, _i, _p, _i], None),
                     "dequant_bf16": ([_p, _p, _p, _i, _i, _i, _p, _i, _i, _p, _i], None),
                     "dequant_f32": ([_p, _p, _p, _i, _i, _i, _p, _i, _i, _p, _i], None),
                     "decode_layer": ([_p, _p, _p, _p, _i, _p, _p, _p, _p, _i, _i, _i], None),
                     "decode_rows": ([_p, _p, _p, _p, _i, _p, _p, _p, _p, _p, _i, _i, _i], None),
                     "attend_rows": ([_i, _i, _i, _i, _f, _p, _p, _p, _p, _i, _i, _i, _p, _i], None),
                     "gate_rows": ([_i, _p, _i, _i, _p, _i], None),
                     "norm_rows": ([_p, _p, _i, _i, _f, _p, _i], None),
                     "rope_rows": ([_p, _i, _i, _i, _i, _i, _p, _p, _i, _i, _i], None),
                     "repack_codes": ([_p, _i, _i, _i, _i, _p, _i], None)},
                    "using torch's int4 kernel")


def qgemm_flags() -> list[str] | None:
    """The compiler flags of qgemm.cpp's build for this CPU, or None where neither form runs."""
    form = _kernel_form()
    if form is None:
        return None
    # AVX2: no -march=native, so the same build wherever AVX2 is asked for
    target = ["-march=native"] if form == "avx512-vnni" else ["-mavx2", "-mfma", "-mf16c"]
    return ["-O3", *target, "-fopenmp", "-ffast-math", "-fPIC", "-std=c++17"]


def kernel_build() -> str:
    """Which build of the runtime's kernel this process runs: its form ("avx512-vnni", "avx2") and the key of its
    compiled library (source, headers, compiler, flags and CPU), or "torch" (torch's int4 op). A machine profile
    measured under one build is stale under another (fit re-probes): a change to the kernel's code had left fit
    predicting 37 tok/s from the old build's probe where the new one decoded 94."""
    lib = library()
    return "torch" if lib is None else f"{_kernel_form()} {Path(lib._name).stem.rsplit('-', 1)[-1]}"


class QLin(ctypes.Structure):
    """qgemm.cpp's QLin: one linear on the kernel; `next` chains the parts of a linear of mixed formats."""


QLin._fields_ = [("w", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("lut", ctypes.c_void_p),
                 ("n", ctypes.c_int), ("k", ctypes.c_int), ("bits", ctypes.c_int), ("codes", ctypes.c_void_p),
                 ("sb", ctypes.c_int), ("low", ctypes.c_int), ("next", ctypes.POINTER(QLin))]


class LayerArgs(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", QLin), ("o", QLin),
                ("gate_up", QLin), ("down", QLin), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("post_attn_norm", ctypes.c_void_p), ("post_mlp_norm", ctypes.c_void_p), ("window", ctypes.c_int)]


class MoEArgs(ctypes.Structure):
    _fields_ = [("router", ctypes.c_void_p), ("gate_up", ctypes.POINTER(QLin)), ("down", ctypes.POINTER(QLin)),
                ("n_experts", ctypes.c_int), ("top_k", ctypes.c_int), ("normalize", ctypes.c_int), ("ffn", ctypes.c_int),
                ("shared_gate_up", ctypes.POINTER(QLin)), ("shared_down", ctypes.POINTER(QLin)),
                ("shared_gate", ctypes.c_void_p), ("shared_ffn", ctypes.c_int)]


class Dims(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("ffn", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rot", ctypes.c_int),
                ("act", ctypes.c_int)]
