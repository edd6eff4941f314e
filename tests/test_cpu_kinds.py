"""CPUs without AVX-512 or without bf16 in hardware: the kernel's AVX2 build, and fp32 where bf16 would be slow."""

import os
import subprocess
import sys

import pytest
import torch

from tightfit.runtime.kernels import AVX2_FLAGS, _cxx, cpu_flags

# every code width, grid and scale layout the kernel runs, on shapes with partial chunks (a row's last chunk of 2,
# 4 or 8 blocks: 4- and 8-bit codes read as dense tails, 6-bit ones laid out whole) and odd rows, through decode
# (M 1: on AVX2, decode_avx2.h where a row's chunks are whole or its last holds 8 blocks), a few tokens and prefill's
# panels (M > 3 on AVX2, > 16 on AVX-512); against the kernel's own arithmetic
# (activations rounded per 32 columns to int8)
CHECK = """
import ctypes
import torch
from tightfit.formats import WeightFormat
from tightfit.quant.core import rtn
from tightfit.runtime.kernels import library
from tightfit.runtime.linear import from_quantized
lib = library()
assert lib is not None
lib.quantize_act.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int]


def kernel_activations(x):
    # the kernel's own int8 activations and block scales, its slice order undone: a reference that rounds them
    # itself lands on the other side of a tie now and then (v / d = -60.500004 here, -60.4999... there)
    m, k = x.shape
    nb = k // 32
    xq = torch.empty(m, k, dtype=torch.int8)
    dx, xs, xsl = (torch.empty(m, nb) for _ in range(3))
    si = torch.empty(m, 2 * nb, dtype=torch.int32)
    lib.quantize_act(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr(), xs.data_ptr(), xsl.data_ptr(), si.data_ptr(), 1)
    col = torch.arange(k)
    b, j = col // 32, col % 32
    c, cb = b // 16, torch.clamp(nb - (b // 16) * 16, max=16)
    pos = c * 512 + (j // 4) * cb * 4 + (b % 16) * 4 + j % 4  # element (b, j) in a chunk's slices
    return xq[:, pos].double() * dx.double().repeat_interleave(32, 1)


torch.manual_seed(0)
worst = 0.0
for name in ("sym4-g32", "asym4-g32", "asym3-g32", "asym5-g32", "sym6-g32", "sym8-g32", "asym8-pc", "nl4-g32",
             "asym4-k32", "sym4-k32", "asym2-k32", "sym6-k32", "sym6-k16", "asym6-g32", "sym8-k32", "nl4-k32"):
    f = WeightFormat.parse(name)
    for n, k in ((53, 576), (19, 512), (13, 128), (11, 768)):
        qw = rtn(torch.randn(n, k) * 0.05, f.for_shape((n, k)))
        lin = from_quantized(qw)
        assert lin.kind in ("q4", "q6", "q8"), (name, lin.kind)
        for m in (1, 2, 3, 4, 6, 9, 19, 37, -1, -2):
            # m -1, -2: one token of all +1 or all -1 (every activation code 127 or -127: the int16 sums' limit)
            x = torch.randn(m, k) if m > 0 else torch.full((1, k), 1.0 if m == -1 else -1.0)
            exact = kernel_activations(x) @ qw.dequantize().double().T
            worst = max(worst, float((lin(x) - exact).norm() / exact.norm()))
print("worst", worst)
"""


@pytest.mark.skipif(not set(AVX2_FLAGS) <= cpu_flags() or _cxx() is None,
                    reason="the AVX2 build needs an AVX2 + FMA + F16C CPU and a C++ compiler")
def test_the_kernels_avx2_build_runs_every_format_exactly(tmp_path):
    """The AVX2 form of qgemm.cpp (avx2_compat.h), built on any CPU that runs it (TIGHTFIT_KERNEL=avx2), gives the
    kernel's own integer arithmetic: a slip in a lane order or a saturating 16-bit sum would be off by ~1."""
    env = {**os.environ, "TIGHTFIT_KERNEL": "avx2"}
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    worst = float(r.stdout.split("worst")[1])
    assert worst < 1e-4, worst


def test_without_bf16_in_hardware_the_heavy_products_run_in_fp32(monkeypatch):
    from tightfit.quant.config import QuantConfig
    from tightfit.quant.core import error_operand, output_error
    from tightfit.runtime.kernels import compute_dtype, native_bf16

    torch.manual_seed(0)
    d, x = torch.randn(48, 64), torch.randn(256, 64)
    H = x.T @ x / 256
    exact = float(((d.double() @ H.double()) * d.double()).sum())
    monkeypatch.setenv("TIGHTFIT_BF16", "0")
    assert not native_bf16() and compute_dtype() == torch.float32
    assert QuantConfig().calib_torch_dtype == torch.float32
    assert error_operand(H).dtype == torch.float32
    assert abs(output_error(d, H) / exact - 1) < 1e-5
    monkeypatch.setenv("TIGHTFIT_BF16", "1")
    assert QuantConfig().calib_torch_dtype == torch.bfloat16 and error_operand(H).dtype == torch.bfloat16
    assert abs(output_error(d, H) / exact - 1) < 2e-2  # bf16 operands, fp32 sums
    assert QuantConfig(calib_dtype="float32").calib_torch_dtype == torch.float32  # an explicit choice stands


def test_a_profile_measured_under_another_kernel_is_probed_again(monkeypatch, tmp_path):
    """fit re-probes when the saved profile's speeds came from another form of the kernel (torch's int4 op before
    the AVX2 build existed, say) or another build of the same form (its code changed), as it does for an older
    probe."""
    import json

    from tightfit.fit import _profile_is_stale
    from tightfit.probe import PROBE_VERSION
    from tightfit.runtime.kernels import kernel_build

    monkeypatch.setenv("TIGHTFIT_CACHE", str(tmp_path))
    profile = tmp_path / "profile.json"
    assert _profile_is_stale()  # none yet
    profile.write_text(json.dumps({"probe_version": PROBE_VERSION, "kernel": kernel_build()}))
    assert not _profile_is_stale()
    other = "torch" if kernel_build() != "torch" else "avx2"
    profile.write_text(json.dumps({"probe_version": PROBE_VERSION, "kernel": other}))
    assert _profile_is_stale()
    if kernel_build() != "torch":  # the same form, another build of its code
        form = kernel_build().split()[0]
        assert kernel_build() != form
        profile.write_text(json.dumps({"probe_version": PROBE_VERSION, "kernel": f"{form} 0123456789abcdef"}))
        assert _profile_is_stale()
    profile.write_text(json.dumps({"probe_version": PROBE_VERSION - 1, "kernel": kernel_build()}))
    assert _profile_is_stale()
