"""A lean decoder forward over runtime weights, for every family in models/families: fused q/k/v and gate/up,
fp32 residual stream, bf16 matmuls, a preallocated KV cache. The variants a family needs (q/k norms, sandwich
norms, GELU-tanh, sliding windows, partial rotary, scaled embeddings) are fields of ModelArgs and Layer, read
by the same loop and by the C decode step. Few ops per token: Python dispatch is most of a small model's decode
time on a CPU (see PERF-NOTES)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import ContextError
from ..models.families import embed_scale_value, family_of
from ..quant.core import QuantizedWeight
from .kv import KVCache
from .linear import VNNI_KINDS, Concat, RuntimeLinear


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
    rot_dim: int  # rotary dimensions of each head (head_dim unless partial)
    act: str  # "silu" | "gelu_tanh"
    embed_scale: float
    attn_scale: float
    windows: tuple[int, ...]  # per layer: attention window in tokens, 0 for full
    layer_types: tuple[str, ...]  # per layer: which RoPE table ("full_attention" | "sliding_attention")
    final_softcap: float | None
    qk_norm_full: bool = False  # q/k norms over all heads (OLMoE)

    @classmethod
    def from_config(cls, config) -> ModelArgs:
        fam = family_of(config, "the runtime's model")
        return cls(config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, fam.head_dim(config), config.intermediate_size, config.vocab_size,
                   config.rms_norm_eps, config.max_position_embeddings, bool(config.tie_word_embeddings),
                   fam.rotary_dim(config), fam.act, embed_scale_value(fam, config), fam.attn_scale(config),
                   tuple(fam.windows(config)), tuple(fam.layer_types(config)), fam.final_softcap(config),
                   fam.qk_norm_full)


class Embedding:
    """Token rows read from the stored codes (quantized), a float table, or a tied head's own kernel weight (one
    copy of the table for both ends of the model)."""

    def __init__(self, table: QuantizedWeight | torch.Tensor | RuntimeLinear, head=None):
        self.table, self.head = table, head

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.table
        if isinstance(t, RuntimeLinear):
            return t.rows(tokens).view(*tokens.shape, -1)
        if isinstance(t, torch.Tensor):
            return t[tokens].float()
        flat = tokens.reshape(-1)
        rows = QuantizedWeight(t.fmt, t.data[flat], t.scales[flat], None if t.mins is None else t.mins[flat],
                               t.g_idx, in_features=t.in_features, packed=t.packed)
        return rows.dequantize().view(*tokens.shape, -1)

    @property
    def nbytes(self) -> int:
        t = self.table
        if isinstance(t, RuntimeLinear):
            return 0 if t is self.head else t.nbytes  # a tied head's bytes are counted there
        parts = [t] if isinstance(t, torch.Tensor) else [x for x in (t.data, t.scales, t.mins, t.g_idx) if x is not None]
        return sum(x.numel() * x.element_size() for x in parts)


NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


@dataclass
class MoEBlock:
    """A mixture-of-experts MLP: an fp32 router, each expert's fused gate/up and down, and optionally a shared
    expert behind a sigmoid gate (Qwen2-MoE). Only the experts a token is routed to are read."""

    router: torch.Tensor  # [experts, dim] fp32
    experts: list  # [(gate_up, down)] per expert
    top_k: int
    normalize: bool  # renormalize the top-k gates to sum to 1
    ffn: int  # one expert's intermediate size
    shared: tuple | None = None  # (gate_up, down) of the shared expert
    shared_gate: torch.Tensor | None = None  # [1, dim] fp32
    shared_ffn: int = 0
    index: int = 0  # the layer's index (a streamed expert's key)

    def linears(self, experts: bool = True) -> list:
        out = [lin for pair in self.experts for lin in pair] if experts else []
        return out + (list(self.shared) if self.shared else [])

    def active_bytes(self) -> float:
        """Weight bytes one token reads: the router, top_k of the experts (on average), the shared expert."""
        experts = sum(lin.nbytes for pair in self.experts for lin in pair)
        shared = sum(lin.nbytes for lin in self.shared) + self.shared_gate.numel() * 4 if self.shared else 0
        return self.router.numel() * 4 + experts * self.top_k / len(self.experts) + shared


@dataclass
class Layer:
    """One decoder layer; norms are full gains (a family's offset folded in), None where the family has none."""

    attn_norm: torch.Tensor
    qkv: RuntimeLinear
    o: RuntimeLinear
    mlp_norm: torch.Tensor
    gate_up: RuntimeLinear | None  # None in an MoE layer
    down: RuntimeLinear | None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    moe: MoEBlock | None = None

    def linears(self, experts: bool = True) -> list[RuntimeLinear]:
        if self.moe is not None:
            return [self.qkv, self.o, *self.moe.linears(experts)]
        return [self.qkv, self.o, self.gate_up, self.down]

    def norms(self) -> list[str]:
        return [n for n in NORMS if getattr(self, n) is not None]


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
        self.act_dtype = torch.float32 if kinds <= set(VNNI_KINDS) else torch.bfloat16
        # per layer type: cos/sin [max_ctx, 1, rot_dim]; each layer's own pair in self.rope
        self.tables = {k: tuple(t.to(self.act_dtype) for t in v) for k, v in rotary.items()}
        self.rope = [self.tables[k] for k in args.layer_types]
        self.kv_format = kv_format
        self.scale = args.attn_scale
        self.info = info or {}
        self.streamer = None  # with a memory budget: reads a streamed layer's weights into place before use

    # ---- sizes ----
    def weight_bytes(self) -> dict:
        if self.streamer is not None:
            s = self.streamer
            return {"resident": s.resident_bytes + s.arena.numel(), "streamed_per_token": s.bytes_per_token,
                    "per_token": s.resident_bytes + s.bytes_per_token}
        layers = sum(lin.nbytes for L in self.layers for lin in L.linears())
        norms = sum(getattr(L, n).numel() * 4 for L in self.layers for n in L.norms()) + self.norm.numel() * 4
        read = sum((L.moe.active_bytes() + L.qkv.nbytes + L.o.nbytes) if L.moe is not None
                   else sum(lin.nbytes for lin in L.linears()) for L in self.layers)
        return {"layers": layers, "head": self.head.nbytes, "embedding": self.embed.nbytes, "norms": norms,
                "per_token": int(read) + self.head.nbytes + norms}

    def new_cache(self, batch: int = 1, max_ctx: int | None = None, kv_format: str | None = None) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, min(max_ctx or a.max_ctx, a.max_ctx),
                       kv_format or self.kv_format)

    # ---- the fused decode step (tightfit's kernel: one C call per layer) ----
    def fused(self):
        """Per-layer argument structs for the C decode step, or None where a layer cannot take it (a linear not on
        tightfit's kernel, full-width q/k norms, or MoE experts streamed from disk: those are fetched per token
        from Python)."""
        if getattr(self, "_fused", False) is not False:
            return self._fused
        import ctypes

        from .kernels import Dims, LayerArgs, MoEArgs, QLin, library

        self._fused = None
        lib = library()
        has_moe = any(L.moe is not None for L in self.layers)
        ok = (lib is not None and not self.args.qk_norm_full and not (has_moe and self.streamer is not None)
              and all(isinstance(part, RuntimeLinear) and part.kind in VNNI_KINDS and part.perm is None
                      for L in self.layers for lin in L.linears() for part in getattr(lin, "parts", [lin])))
        if not ok:
            return None
        keep = []  # ctypes arrays and tensors the structs point into

        def q(lin, bias=None):
            if lin is None:
                return QLin()
            if isinstance(lin, Concat):  # parts of mixed formats: a chain, the concatenation's bias split over it
                b = None if lin.bias is None else lin.bias.float()
                keep.append(b)
                chain, off = None, lin.out_features
                for part in reversed(lin.parts):
                    off -= part.out_features
                    s = q(part, None if b is None else b[off:off + part.out_features])
                    if chain is not None:
                        keep.append(chain)
                        s.next = ctypes.pointer(chain)
                    chain = s
                return chain
            b = lin.bias if bias is None else bias
            return QLin(lin.weight.data_ptr(), lin.scales_zeros.data_ptr(),
                        0 if b is None else b.data_ptr(), 0 if lin.lut is None else lin.lut.data_ptr(),
                        lin.out_features, lin.in_features, lin.group,
                        0 if lin.scale_codes is None else lin.scale_codes.data_ptr(), lin.sb, lin.low)

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        def moe_args(m):
            if m is None:
                return None
            gu = (QLin * len(m.experts))(*(q(g) for g, _ in m.experts))
            dn = (QLin * len(m.experts))(*(q(d) for _, d in m.experts))
            shared = [ctypes.pointer(q(lin)) for lin in m.shared] if m.shared else [None, None]
            keep.extend([gu, dn, *shared])
            return MoEArgs(m.router.data_ptr(), gu, dn, len(m.experts), m.top_k, int(m.normalize), m.ffn,
                           shared[0], shared[1], ptr(m.shared_gate), m.shared_ffn)

        a = self.args
        dims = Dims(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.norm_eps, self.scale, a.rot_dim,
                    {"silu": 0, "gelu_tanh": 1}[a.act])
        layers = [LayerArgs(L.attn_norm.data_ptr(), L.mlp_norm.data_ptr(), q(L.qkv), q(L.o), q(L.gate_up),
                            q(L.down), ptr(L.q_norm), ptr(L.k_norm), ptr(L.post_attn_norm), ptr(L.post_mlp_norm),
                            w) for L, w in zip(self.layers, a.windows)]
        moes = [moe_args(L.moe) for L in self.layers]
        # references and each layer's RoPE table addresses made once: the per-token loop passes them as they are
        rope = [(c.data_ptr(), sn.data_ptr(), c.stride(0) * c.element_size()) for c, sn in self.rope]
        self._fused = (lib, dims, layers, ctypes.byref(dims), [ctypes.byref(la) for la in layers], rope,
                       [None if m is None else ctypes.byref(m) for m in moes], (moes, keep))
        return self._fused

    def _fused_decode(self, h: torch.Tensor, pos: int, cache: KVCache) -> None:
        lib, _, _, dims_ref, layer_refs, rope, moe_refs, _ = self._fused
        kb, vb = cache.k.data_ptr(), cache.v.data_ptr()
        per_layer = cache.k[0].numel() * cache.k.element_size()
        bf16, threads, hp = int(cache.k.dtype == torch.bfloat16), torch.get_num_threads(), h.data_ptr()
        streamer, decode, cap = self.streamer, lib.decode_layer, cache.max_ctx
        for i, la in enumerate(layer_refs):
            if streamer is not None:
                streamer.fetch(i)
            cp, sp, st = rope[i]
            decode(dims_ref, la, moe_refs[i], hp, pos, cp + pos * st, sp + pos * st, kb + i * per_layer,
                   vb + i * per_layer, cap, bf16, threads)

    def _fused_rows(self, h: torch.Tensor, positions: list[int], caches: list[KVCache]) -> None:
        """The C decode step of several sequences (decode_rows): h [B, 1, dim] fp32, updated in place."""
        import ctypes

        lib, _, _, dims_ref, layer_refs, rope, moe_refs, _ = self._fused
        B, c0 = len(caches), caches[0]
        P = ctypes.c_void_p * B
        pos = (ctypes.c_int * B)(*positions)
        per_layer = c0.k[0].numel() * c0.k.element_size()
        kbs, vbs = [c.k.data_ptr() for c in caches], [c.v.data_ptr() for c in caches]
        bf16, threads, hp, cap = int(c0.k.dtype == torch.bfloat16), torch.get_num_threads(), h.data_ptr(), c0.max_ctx
        for i, la in enumerate(layer_refs):
            if self.streamer is not None:
                self.streamer.fetch(i)
            cp, sp, st = rope[i]
            lib.decode_rows(dims_ref, la, moe_refs[i], hp, B, pos, P(*(cp + p * st for p in positions)),
                            P(*(sp + p * st for p in positions)), P(*(k + i * per_layer for k in kbs)),
                            P(*(v + i * per_layer for v in vbs)), cap, bf16, threads)

    # ---- forward ----
    def rms_norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 RMSNorm -> the activations' dtype (F.rms_norm costs ~17 us per call on a [1, 576] input here; this
        ~5 us); prefill's rows in one C pass where the kernel is loaded."""
        lib = self._rows_lib(h, w)
        if lib is not None:
            out = torch.empty_like(h)
            lib.norm_rows(h.data_ptr(), w.data_ptr(), h.numel() // h.shape[-1], h.shape[-1], self.args.norm_eps,
                          out.data_ptr(), torch.get_num_threads())
            return out
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.args.norm_eps) * w).to(self.act_dtype)

    def _rows_lib(self, *ts: torch.Tensor):
        """The kernel library where prefill's row-wise ops can run in it: several fp32 contiguous rows."""
        if (self.act_dtype != torch.float32 or ts[0].numel() <= ts[0].shape[-1]
                or not all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)):
            return None
        from .kernels import library

        return library()

    def _norm32(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.args.norm_eps) * w

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return h if self.args.embed_scale == 1.0 else h.mul_(self.args.embed_scale)

    def _qk(self, L: Layer, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q and k heads [B, T, H + KV, hd] of a layer's qkv output: per-head norms (where the family has them),
        then rotate-half RoPE on the first rot_dim dimensions."""
        a = self.args
        H = a.n_heads
        qk = qkv[:, :, : H + a.n_kv_heads]
        if L.q_norm is not None and a.qk_norm_full:
            B, T = qk.shape[:2]
            q = self._norm32(qk[:, :, :H].reshape(B, T, -1), L.q_norm).view(B, T, H, -1)
            k = self._norm32(qk[:, :, H:].reshape(B, T, -1), L.k_norm).view(B, T, a.n_kv_heads, -1)
            qk = torch.cat((q, k), 2).to(qkv.dtype)
        elif L.q_norm is not None:
            qk = torch.cat((self._norm32(qk[:, :, :H], L.q_norm), self._norm32(qk[:, :, H:], L.k_norm)), 2)
            qk = qk.to(qkv.dtype)
        rot = a.rot_dim
        lib = self._rows_lib(qkv, cos, sin) if cos.dim() == 3 and qk.stride(2) == a.head_dim else None
        if lib is not None and (qk.data_ptr() == qkv.data_ptr() or qk.is_contiguous()):
            # in place: the un-rotated q and k are not read again
            B, T = qk.shape[:2]
            lib.rope_rows(qk.data_ptr(), B * T, qk.stride(1), H + a.n_kv_heads, a.head_dim, rot, cos.data_ptr(),
                          sin.data_ptr(), cos.shape[0], cos.stride(0), torch.get_num_threads())
            return qk
        if rot == a.head_dim:
            half = rot // 2
            return qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
        r, half = qk[..., :rot], rot // 2
        r = r * cos + torch.cat((-r[..., half:], r[..., :half]), -1) * sin
        return torch.cat((r, qk[..., rot:]), -1)

    def _act(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (F.silu(g) if self.args.act == "silu" else F.gelu(g, approximate="tanh")) * u

    def _gated(self, gu: torch.Tensor, ffn: int) -> torch.Tensor:
        """act(gate) * up of a fused gate/up output [..., 2 ffn]: in one pass in C where the kernel is loaded and
        the rows are fp32 (prefill), else in torch."""
        lib = self._rows_lib(gu)
        if lib is None:
            g, u = gu.split(ffn, -1)
            return self._act(g, u)
        out = torch.empty(*gu.shape[:-1], ffn)
        lib.gate_rows(0 if self.args.act == "silu" else 1, gu.data_ptr(), gu.numel() // (2 * ffn), ffn,
                      out.data_ptr(), torch.get_num_threads())
        return out

    def _mlp(self, L: Layer, h: torch.Tensor) -> None:
        """h += the layer's MLP (in place)."""
        if L.moe is not None:
            h += self._moe(L.moe, self._norm32(h, L.mlp_norm))
            return
        d = L.down(self._gated(L.gate_up(self.rms_norm(h, L.mlp_norm)), self.args.ffn_dim))
        h += d if L.post_mlp_norm is None else self._norm32(d, L.post_mlp_norm)

    def _moe(self, m: MoEBlock, x: torch.Tensor) -> torch.Tensor:
        """The MoE block on normed inputs x (fp32): routed in fp32 (a near tie routed otherwise would change which
        expert runs), each hit expert over the rows routed to it."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(flat @ m.router.T, -1)
        w, idx = probs.topk(m.top_k, -1)
        if m.normalize:
            w = w / w.sum(-1, keepdim=True)
        xa = flat.to(self.act_dtype)
        out = torch.zeros(flat.shape[0], shape[-1])
        if m.shared is not None:  # first: a streamed expert's weights take the arena the layer's are in
            gate_up, down = m.shared
            out += torch.sigmoid(flat @ m.shared_gate.T) * down(self._gated(gate_up(xa), m.shared_ffn)).float()
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if self.streamer is not None:
                self.streamer.fetch(("expert", m.index, e))
            gate_up, down = m.experts[e]
            out.index_add_(0, rows, down(self._gated(gate_up(xa[rows]), m.ffn)).float() * w[rows, slot, None])
        return out.view(shape)

    def _attn_out(self, L: Layer, h: torch.Tensor, att: torch.Tensor) -> None:
        o = L.o(att)
        h += o if L.post_attn_norm is None else self._norm32(o, L.post_attn_norm)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, logits_to_keep: int = 1) -> torch.Tensor:
        """Logits (fp32) of the last `logits_to_keep` positions for tokens [batch, T] placed at positions pos.."""
        a = self.args
        B, T = tokens.shape
        if pos + T > cache.max_ctx:
            raise ContextError(f"{pos + T} tokens exceed the context of {cache.max_ctx}: shorten the prompt or "
                               "lower max_tokens.")
        H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
        h = self._embed(tokens)
        if (T == 1 and B == 1 and cache.bits is None and cache.k.dtype in (torch.float32, torch.bfloat16)
                and self.act_dtype == torch.float32 and self.fused() is not None):
            h = h.contiguous()
            self._fused_decode(h, pos, cache)
            return self._logits(h)
        masks = {}
        for i, L in enumerate(self.layers):
            if self.streamer is not None:
                self.streamer.fetch(i)
            cos, sin = (t[pos:pos + T] for t in self.rope[i])
            x = self.rms_norm(h, L.attn_norm)
            qkv = L.qkv(x).view(B, T, H + 2 * KV, hd)
            qk = self._qk(L, qkv, cos, sin)
            kt, v = cache.update(i, qk[:, :, H:].transpose(1, 2), qkv[:, :, H + KV:].transpose(1, 2), pos)
            q = qk[:, :, :H].transpose(1, 2).to(kt.dtype)
            w = a.windows[i]
            if T == 1:  # decode: CPU SDPA kernels cost ~0.4 ms per call here; two small matmuls cost ~20 us
                if w and pos + 1 > w:
                    kt, v = kt[..., pos + 1 - w:], v[:, :, pos + 1 - w:]
                # fp32 matmuls: bf16/fp16 batched matmuls of these small shapes cost 3-10x more here
                scores = torch.matmul(q.reshape(B, KV, H // KV, hd).float(), kt.float()) * self.scale
                att = torch.matmul(torch.softmax(scores, -1), v.float()).view(B, 1, H * hd)
            else:
                if w not in masks:
                    masks[w] = _mask(T, pos, w)
                mask = masks[w]
                # fp32 attention, as llama.cpp computes it over its 16-bit cache (bf16 softmax inputs cost accuracy);
                # keys made contiguous: the cache holds them transposed, and strided keys cost 3x in SDPA here
                keys = kt.transpose(-1, -2).to(torch.float32, memory_format=torch.contiguous_format)
                att = F.scaled_dot_product_attention(q.float(), keys, v.float(),
                                                     attn_mask=mask, is_causal=mask is None, enable_gqa=KV != H,
                                                     scale=self.scale)
                att = att.transpose(1, 2).reshape(B, T, H * hd)
            self._attn_out(L, h, att)
            self._mlp(L, h)
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
        if (self.act_dtype == torch.float32 and self.fused() is not None and caches[0].bits is None
                and caches[0].k.dtype in (torch.float32, torch.bfloat16)
                and all(c.bits is None and c.k.dtype == caches[0].k.dtype and c.max_ctx == caches[0].max_ctx
                        for c in caches)):
            h = self._embed(torch.tensor(tokens)[:, None]).contiguous()
            self._fused_rows(h, positions, caches)
            return self._logits(h)[:, -1]
        H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
        attend = self._rows_attention(positions, caches)
        h = self._embed(torch.tensor(tokens)[:, None])
        pos = torch.tensor(positions)
        # each RoPE table's rows at the rows' positions, gathered once per step: [B, 1, 1, rot_dim]
        rows = {k: (c[pos][:, None], sn[pos][:, None]) for k, (c, sn) in self.tables.items()}
        for i, L in enumerate(self.layers):
            if self.streamer is not None:
                self.streamer.fetch(i)
            cos, sin = rows[a.layer_types[i]]
            x = self.rms_norm(h, L.attn_norm)
            qkv = L.qkv(x).view(B, 1, H + 2 * KV, hd)
            qk = self._qk(L, qkv, cos, sin)
            self._attn_out(L, h, attend(qk, qkv[:, :, H + KV:], i))
            self._mlp(L, h)
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
                lib.attend_rows(B, H, KV, hd, self.scale, qkv.data_ptr(), ks, vs, pos, cap, a.windows[i], bf16,
                                out.data_ptr(), threads)
                return out
            return attend

        def attend(qk, v, i):
            rows, w = [], a.windows[i]
            for b in range(B):
                p = positions[b]
                kt, vc = caches[b].update(i, qk[b:b + 1, :, H:].transpose(1, 2), v[b:b + 1].transpose(1, 2), p)
                if w and p + 1 > w:
                    kt, vc = kt[..., p + 1 - w:], vc[:, :, p + 1 - w:]
                q = qk[b:b + 1, :, :H].transpose(1, 2).to(kt.dtype)
                scores = torch.matmul(q.reshape(1, KV, H // KV, hd).float(), kt.float()) * self.scale
                rows.append(torch.matmul(torch.softmax(scores, -1), vc.float()).view(1, 1, H * hd))
            return torch.cat(rows)
        return attend

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.rms_norm(h, self.norm)
        if self.streamer is not None:
            self.streamer.fetch("head")
        logits = self.head(x).float()
        cap = self.args.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def __call__(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_):
        """One-shot scoring (evaluation): a fresh cache sized to the input."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T)
        logits = self.forward(input_ids, 0, cache, logits_to_keep or T)
        return SimpleNamespace(logits=logits)

    def eval(self):
        return self


def _mask(T: int, pos: int, window: int) -> torch.Tensor | None:
    """Which cached positions each of T new queries at pos.. attends to (bool [T, pos + T]); None where plain
    causal attention from position 0 is it."""
    if pos == 0 and not (window and T > window):
        return None
    q = torch.arange(pos, pos + T)[:, None]
    k = torch.arange(pos + T)[None]
    m = k <= q
    return m & (q - k < window) if window else m
