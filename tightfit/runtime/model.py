"""A lean Llama/Qwen2 forward over runtime weights: fused q/k/v and gate/up, fp32 residual stream, bf16 matmuls,
a preallocated KV cache. Few ops per token, no per-layer branching: Python dispatch is most of a small model's
decode time on a CPU (see PERF-NOTES)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import ContextError, UnsupportedArchitectureError
from ..quant.core import QuantizedWeight
from .kv import KVCache
from .linear import RuntimeLinear

RUNTIME_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    max_ctx: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> ModelArgs:
        if config.model_type not in RUNTIME_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"the runtime runs model types {list(RUNTIME_MODEL_TYPES)}, not {config.model_type!r}. Evaluate it "
                "without the runtime (tightfit eval on the source model) or export it to GGUF for llama.cpp.")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size,
                   config.rms_norm_eps, config.max_position_embeddings, bool(config.tie_word_embeddings))


class Embedding:
    """Token rows read from the stored codes (quantized) or a float table."""

    def __init__(self, table: QuantizedWeight | torch.Tensor):
        self.table = table

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.table
        if isinstance(t, torch.Tensor):
            return t[tokens].float()
        flat = tokens.reshape(-1)
        rows = QuantizedWeight(t.fmt, t.data[flat], t.scales[flat], None if t.mins is None else t.mins[flat],
                               t.g_idx, in_features=t.in_features, packed=t.packed)
        return rows.dequantize().view(*tokens.shape, -1)

    @property
    def nbytes(self) -> int:
        t = self.table
        parts = [t] if isinstance(t, torch.Tensor) else [x for x in (t.data, t.scales, t.mins, t.g_idx) if x is not None]
        return sum(x.numel() * x.element_size() for x in parts)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: RuntimeLinear
    o: RuntimeLinear
    mlp_norm: torch.Tensor
    gate_up: RuntimeLinear
    down: RuntimeLinear

    def linears(self) -> list[RuntimeLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class Engine:
    """The runtime model. `engine(ids, logits_to_keep=n)` mirrors a transformers causal LM for evaluation;
    `forward(tokens, pos, cache)` is the incremental form generation uses."""

    def __init__(self, config, args: ModelArgs, embed: Embedding, layers: list[Layer], norm: torch.Tensor,
                 head: RuntimeLinear, rotary: tuple[torch.Tensor, torch.Tensor], kv_format: str = "bf16",
                 info: dict | None = None):
        self.config, self.args, self.embed, self.layers, self.norm, self.head = config, args, embed, layers, norm, head
        # activations between matmuls: fp32 when every linear runs on tightfit's kernel (it takes fp32),
        # else bf16 (torch's int4 op takes bf16 only)
        kinds = {lin.kind for L in layers for lin in L.linears() for lin in getattr(lin, "parts", [lin])}
        self.act_dtype = torch.float32 if kinds <= {"q4", "q8"} else torch.bfloat16
        self.cos, self.sin = (t.to(self.act_dtype) for t in rotary)  # [max_ctx, 1, head_dim]
        self.kv_format = kv_format
        self.scale = args.head_dim ** -0.5
        self.info = info or {}
        self.streamer = None  # with a memory budget: reads a streamed layer's weights into place before use

    # ---- sizes ----
    def weight_bytes(self) -> dict:
        if self.streamer is not None:
            s = self.streamer
            return {"resident": s.resident_bytes + s.arena.numel(), "streamed_per_token": s.bytes_per_token,
                    "per_token": s.resident_bytes + s.bytes_per_token}
        layers = sum(lin.nbytes for L in self.layers for lin in L.linears())
        norms = sum(L.attn_norm.numel() * 4 + L.mlp_norm.numel() * 4 for L in self.layers) + self.norm.numel() * 4
        return {"layers": layers, "head": self.head.nbytes, "embedding": self.embed.nbytes, "norms": norms,
                "per_token": layers + self.head.nbytes + norms}

    def new_cache(self, batch: int = 1, max_ctx: int | None = None, kv_format: str | None = None) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, min(max_ctx or a.max_ctx, a.max_ctx),
                       kv_format or self.kv_format)

    # ---- the fused decode step (tightfit's kernel: one C call per layer) ----
    def fused(self):
        """Per-layer argument structs for the C decode step, or None where a layer cannot take it."""
        if getattr(self, "_fused", False) is not False:
            return self._fused
        from .kernels import Dims, LayerArgs, QLin, library

        self._fused = None
        lib = library()
        ok = lib is not None and all(isinstance(lin, RuntimeLinear) and lin.kind in ("q4", "q8") and lin.perm is None
                                     for L in self.layers for lin in L.linears())
        if ok:
            def q(lin):
                return QLin(lin.weight.data_ptr(), lin.scales_zeros.data_ptr(),
                            0 if lin.bias is None else lin.bias.data_ptr(), lin.out_features, lin.in_features, lin.group)
            import ctypes

            a = self.args
            dims = Dims(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.norm_eps, self.scale)
            layers = [LayerArgs(L.attn_norm.data_ptr(), L.mlp_norm.data_ptr(), q(L.qkv), q(L.o), q(L.gate_up),
                                q(L.down)) for L in self.layers]
            # references made once: the per-token loop passes them as they are
            self._fused = (lib, dims, layers, ctypes.byref(dims), [ctypes.byref(la) for la in layers])
        return self._fused

    def _fused_decode(self, h: torch.Tensor, pos: int, cache: KVCache) -> None:
        lib, _, _, dims_ref, layer_refs = self._fused
        stride = self.cos.stride(0) * 4
        cos, sin = self.cos.data_ptr() + pos * stride, self.sin.data_ptr() + pos * stride
        kb, vb = cache.k.data_ptr(), cache.v.data_ptr()
        per_layer = cache.k[0].numel() * cache.k.element_size()
        bf16, threads, hp = int(cache.k.dtype == torch.bfloat16), torch.get_num_threads(), h.data_ptr()
        for i, la in enumerate(layer_refs):
            if self.streamer is not None:
                self.streamer.fetch(i)
            lib.decode_layer(dims_ref, la, hp, pos, cos, sin, kb + i * per_layer,
                             vb + i * per_layer, cache.max_ctx, bf16, threads)

    # ---- forward ----
    def rms_norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 RMSNorm -> bf16 (F.rms_norm costs ~17 us per call on a [1, 576] input here; this ~5 us)."""
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.args.norm_eps) * w).to(self.act_dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, logits_to_keep: int = 1) -> torch.Tensor:
        """Logits (fp32) of the last `logits_to_keep` positions for tokens [batch, T] placed at positions pos.."""
        a = self.args
        B, T = tokens.shape
        if pos + T > cache.max_ctx:
            raise ContextError(f"{pos + T} tokens exceed the context of {cache.max_ctx}: shorten the prompt or "
                               "lower max_tokens.")
        H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
        h = self.embed(tokens)
        if (T == 1 and B == 1 and cache.bits is None and cache.k.dtype in (torch.float32, torch.bfloat16)
                and self.act_dtype == torch.float32 and self.fused() is not None):
            h = h.contiguous()
            self._fused_decode(h, pos, cache)
            return self._logits(h)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        mask = None
        if T > 1 and pos > 0:
            mask = torch.ones(T, pos + T, dtype=torch.bool).tril(pos)
        causal = T > 1 and pos == 0
        half = hd // 2
        for i, L in enumerate(self.layers):
            if self.streamer is not None:
                self.streamer.fetch(i)
            x = self.rms_norm(h, L.attn_norm)
            qkv = L.qkv(x).view(B, T, H + 2 * KV, hd)
            qk = qkv[:, :, : H + KV]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            kt, v = cache.update(i, qk[:, :, H:].transpose(1, 2), qkv[:, :, H + KV:].transpose(1, 2), pos)
            q = qk[:, :, :H].transpose(1, 2).to(kt.dtype)
            if T == 1:  # decode: CPU SDPA kernels cost ~0.4 ms per call here; two small matmuls cost ~20 us
                # fp32 matmuls: bf16/fp16 batched matmuls of these small shapes cost 3-10x more here
                scores = torch.matmul(q.reshape(B, KV, H // KV, hd).float(), kt.float()) * self.scale
                att = torch.matmul(torch.softmax(scores, -1), v.float()).view(B, 1, H * hd)
            else:
                # fp32 attention, as llama.cpp computes it over its 16-bit cache (bf16 softmax inputs cost accuracy)
                att = F.scaled_dot_product_attention(q.float(), kt.transpose(-1, -2).float(), v.float(), attn_mask=mask,
                                                     is_causal=causal, enable_gqa=KV != H)
                att = att.transpose(1, 2).reshape(B, T, H * hd)
            h += L.o(att)
            x = self.rms_norm(h, L.mlp_norm)
            g, u = L.gate_up(x).split(a.ffn_dim, -1)
            h += L.down(F.silu(g) * u)
        return self._logits(h[:, -logits_to_keep:])

    @torch.inference_mode()
    def decode_rows(self, tokens: list[int], positions: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of several sequences, each at its own position in its own cache: the linears run once
        over all rows (the weights are read once per step), attention per row. Logits (fp32) [rows, vocab]."""
        B = len(tokens)
        if B == 1:  # the fused single-sequence step where the kernels allow it
            return self.forward(torch.tensor([tokens]), positions[0], caches[0])[:, -1]
        for c, p in zip(caches, positions):
            if p + 1 > c.max_ctx:
                raise ContextError(f"{p + 1} tokens exceed the context of {c.max_ctx}.")
        a = self.args
        H, KV, hd, half = a.n_heads, a.n_kv_heads, a.head_dim, a.head_dim // 2
        attend = self._rows_attention(positions, caches)
        h = self.embed(torch.tensor(tokens)[:, None])
        pos = torch.tensor(positions)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, 1, head_dim]
        for i, L in enumerate(self.layers):
            if self.streamer is not None:
                self.streamer.fetch(i)
            x = self.rms_norm(h, L.attn_norm)
            qkv = L.qkv(x).view(B, 1, H + 2 * KV, hd)
            qk = qkv[:, :, : H + KV]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            h += L.o(attend(qk, qkv[:, :, H + KV:], i))
            x = self.rms_norm(h, L.mlp_norm)
            g, u = L.gate_up(x).split(a.ffn_dim, -1)
            h += L.down(F.silu(g) * u)
        return self._logits(h)[:, -1]

    def _rows_attention(self, positions: list[int], caches: list[KVCache]):
        """attend(qk [B, 1, H + KV, hd] after RoPE, v [B, 1, KV, hd], layer) -> [B, 1, H * hd]: each row's k and v
        stored at its position in its cache, then its attention: one C call per layer for float caches (the
        fused kernel's own attention code), else per row in torch."""
        import ctypes

        from .kernels import library

        a, lib = self.args, library()
        H, KV, hd, B = a.n_heads, a.n_kv_heads, a.head_dim, len(caches)
        if lib is not None and all(c.bits is None and c.k.dtype == caches[0].k.dtype and c.max_ctx == caches[0].max_ctx
                                   for c in caches) and caches[0].k.dtype in (torch.float32, torch.bfloat16):
            pos = (ctypes.c_int * B)(*positions)
            bf16, cap, threads = int(caches[0].k.dtype == torch.bfloat16), caches[0].max_ctx, torch.get_num_threads()

            def attend(qk, v, i):
                qkv = torch.cat((qk, v), 2).float().contiguous()
                out = torch.empty(B, 1, H * hd)
                ks = (ctypes.c_void_p * B)(*(c.k[i].data_ptr() for c in caches))
                vs = (ctypes.c_void_p * B)(*(c.v[i].data_ptr() for c in caches))
                lib.attend_rows(B, H, KV, hd, self.scale, qkv.data_ptr(), ks, vs, pos, cap, bf16, out.data_ptr(),
                                threads)
                return out
            return attend

        def attend(qk, v, i):
            rows = []
            for b in range(B):
                kt, vc = caches[b].update(i, qk[b:b + 1, :, H:].transpose(1, 2), v[b:b + 1].transpose(1, 2),
                                          positions[b])
                q = qk[b:b + 1, :, :H].transpose(1, 2).to(kt.dtype)
                scores = torch.matmul(q.reshape(1, KV, H // KV, hd).float(), kt.float()) * self.scale
                rows.append(torch.matmul(torch.softmax(scores, -1), vc.float()).view(1, 1, H * hd))
            return torch.cat(rows)
        return attend

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.rms_norm(h, self.norm)
        if self.streamer is not None:
            self.streamer.fetch("head")
        return self.head(x).float()

    def __call__(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_):
        """One-shot scoring (evaluation): a fresh cache sized to the input."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T)
        logits = self.forward(input_ids, 0, cache, logits_to_keep or T)
        return SimpleNamespace(logits=logits)

    def eval(self):
        return self
