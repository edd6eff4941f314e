"""What llama.cpp's quantization types are, in the quality prior's terms: each GGML type's relative weight MSE on the
prior's reference matrix, and which type llama-quantize gives each tensor of a model for a mixed file type
(Q4_K_M, Q3_K_M, ...), read back from llama-quantize's own output.

1) rel_mse: the prior's heavy-tailed reference matrix (tightfit.planner.prior.reference_matrix, widened to a
   multiple of 256 so every K-type applies), written as an F32 GGUF, quantized with `llama-quantize --pure TYPE`,
   dequantized with gguf-py: ||W - Q(W)||^2 / ||W||^2 per type.
2) mix: a tiny model GGUF of the same architecture, layer count, head counts and embedding tying as the model in
   question (rows 256 wide: llama-quantize's mixing rules look at names, layer index, GQA ratio and experts, not
   widths), quantized with each mixed file type; the type of every tensor role in every layer is recorded.
Needs llama-quantize (bash bench/build_llama_tools.sh). Writes bench/results/llama_types.json.
Usage: python bench/llama_types.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "results" / "llama_types.json"
PURE = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
MIXED = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q4_0")
# the models the validation table needs a mix for: architecture, layers, heads, KV heads, tied embedding
MODELS = {
    "llama-3-8b": ("llama", 32, 32, 8, False),
    "llama-3-70b": ("llama", 80, 64, 8, False),
    "llama-2-7b": ("llama", 32, 32, 32, False),
    "llama-2-70b": ("llama", 80, 64, 8, False),
    "qwen2.5-1.5b": ("qwen2", 28, 12, 2, True),
}
ROLES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
         "ffn_down": "down", "token_embd": "embed", "output": "head"}


def tools() -> Path:
    out = subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def quantize(bin_dir: Path, src: Path, dst: Path, ftype: str, pure: bool = False) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    cmd = [str(bin_dir / "llama-quantize")] + (["--pure"] if pure else []) + [str(src), str(dst), ftype, "1"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)


def _writer(path: Path, arch: str, layers: int, heads: int, kv: int, dim: int, ffn: int):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    return w


def _close(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rel_mse(bin_dir: Path, tmp: Path) -> dict[str, float]:
    import gguf
    from gguf.quants import dequantize

    from tightfit.planner.prior import reference_matrix

    m = reference_matrix().numpy().astype(np.float32)
    src = tmp / "ref.gguf"
    w = _writer(src, "llama", 1, 8, 8, m.shape[1], m.shape[0])
    w.add_tensor("blk.0.ffn_up.weight", m)
    _close(w)
    out = {}
    for t in PURE:
        dst = tmp / f"ref-{t}.gguf"
        quantize(bin_dir, src, dst, t, pure=True)
        ten = next(x for x in gguf.GGUFReader(str(dst)).tensors if x.name == "blk.0.ffn_up.weight")
        q = dequantize(ten.data, ten.tensor_type).reshape(m.shape)
        out[t] = float(((q - m) ** 2).sum() / (m ** 2).sum())
        print(f"{t:7s} rel_mse {out[t]:.3e}", flush=True)
    return out


def mix(bin_dir: Path, tmp: Path, name: str, arch: str, layers: int, heads: int, kv: int, tied: bool) -> dict:
    import gguf

    dim, ffn, vocab = math.lcm(256, heads), 512, 512  # every row a whole number of 256-blocks
    hd = dim // heads
    rng = np.random.default_rng(0)
    src = tmp / f"{name}.gguf"
    w = _writer(src, arch, layers, heads, kv, dim, ffn)

    def t(n, shape):
        w.add_tensor(n, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", (vocab, dim))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    if not tied:
        t("output.weight", (vocab, dim))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(dim, np.float32))
        t(p + "attn_q.weight", (heads * hd, dim))
        t(p + "attn_k.weight", (kv * hd, dim))
        t(p + "attn_v.weight", (kv * hd, dim))
        t(p + "attn_output.weight", (dim, heads * hd))
        t(p + "ffn_gate.weight", (ffn, dim))
        t(p + "ffn_up.weight", (ffn, dim))
        t(p + "ffn_down.weight", (dim, ffn))
    _close(w)
    types = {}
    for ft in MIXED:
        dst = tmp / f"{name}-{ft}.gguf"
        quantize(bin_dir, src, dst, ft)
        per = {}
        for ten in gguf.GGUFReader(str(dst)).tensors:
            parts = ten.name.split(".")
            if parts[-1] != "weight" or ten.tensor_type.name in ("F32",):
                continue
            layer = int(parts[1]) if parts[0] == "blk" else None
            role = ROLES.get(parts[2] if layer is not None else parts[0])
            if role:
                per.setdefault(role, {})[str(layer) if layer is not None else "-"] = ten.tensor_type.name
        types[ft] = per
        dst.unlink()
        print(f"{name} {ft}: " + ", ".join(f"{r}={sorted(set(v.values()))}" for r, v in per.items()), flush=True)
    return types


def main() -> int:
    bin_dir = tools()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = {"about": __doc__.split("\n\n")[0], "rel_mse": rel_mse(bin_dir, tmp),
               "mix": {name: mix(bin_dir, tmp, name, *spec) for name, spec in MODELS.items()}}
    OUT.write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
