"""A model described from its config.json alone: the weight tensors the planner chooses formats for, the KV
cache per token, and parameters total and active per token. Dense, MoE (routed + shared experts) and MLA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TightfitError

CONFIGS = Path(__file__).with_name("configs")


class SpecError(TightfitError, ValueError):
    """A config the planner cannot describe."""


@dataclass(frozen=True)
class Item:
    """Tensors that take one format together: one weight, or all experts of one role in one layer."""

    name: str
    layer: int | None  # None: embedding / head
    role: str
    shape: tuple[int, int]  # [out, in] of one tensor
    count: int = 1  # tensors in the item (experts)
    active: float = 1.0  # tensors read per token at batch 1 (routed experts: experts_per_token)
    experts: int = 0  # routed experts in the item (0: not routed)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1] * self.count

    def read_fraction(self, batch: int) -> float:
        """Share of the item's tensors one decode step reads at this batch (distinct routed experts)."""
        if not self.experts:
            return 1.0
        k, e = self.active, self.experts
        return min(1.0, (1 - (1 - k / e) ** batch))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    kv_elems_per_token_layer: int  # cached elements per token per layer (K and V, or MLA's compressed latent)
    items: tuple[Item, ...]
    norm_params: int
    source: str = ""
    max_ctx: int = 8192

    @property
    def params(self) -> int:
        return sum(i.params for i in self.items) + self.norm_params

    @property
    def active_params(self) -> float:
        return sum(i.params * (i.active / i.count if i.experts else 1.0) for i in self.items) + self.norm_params

    @property
    def widest(self) -> float:
        """The widest activation a layer writes per token: a projection's output (routed experts: those a token
        goes to), not the row-parallel outputs (o, down), which are the hidden size."""
        return max(i.shape[0] * (1 if not i.experts else i.active) for i in self.items
                   if i.layer is not None and i.role not in ("o", "down", "expert_down", "router"))

    def layer_items(self, layer: int) -> list[Item]:
        return [i for i in self.items if i.layer == layer]


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


# the sizes a config.json states that the planner builds items from: each must be an integer in range (a file that
# claims 10^12 layers must not make the planner loop over them)
SIZE_FIELDS = {"hidden_size": 1 << 20, "num_hidden_layers": 4096, "num_attention_heads": 1 << 14,
               "vocab_size": 1 << 24, "num_key_value_heads": 1 << 14, "head_dim": 1 << 14,
               "intermediate_size": 1 << 22, "num_experts": 1 << 14, "n_routed_experts": 1 << 14,
               "num_local_experts": 1 << 14, "num_experts_per_tok": 1 << 14, "moe_intermediate_size": 1 << 22,
               "n_shared_experts": 1 << 10, "first_k_dense_replace": 4096, "kv_lora_rank": 1 << 16,
               "qk_rope_head_dim": 1 << 14, "qk_nope_head_dim": 1 << 14, "v_head_dim": 1 << 14,
               "q_lora_rank": 1 << 16, "max_position_embeddings": 1 << 26,
               "shared_expert_intermediate_size": 1 << 22, "decoder_sparse_step": 4096}
MAY_BE_ZERO = {"num_experts", "n_routed_experts", "num_local_experts", "num_experts_per_tok", "n_shared_experts",
               "first_k_dense_replace", "kv_lora_rank", "q_lora_rank"}


def _check_sizes(cfg, name: str) -> None:
    if not isinstance(cfg, dict):
        raise SpecError(f"{name}: config.json holds {type(cfg).__name__}, not a JSON object.")
    for key, limit in SIZE_FIELDS.items():
        v = cfg.get(key)
        if v is None:
            continue
        low = 0 if key in MAY_BE_ZERO else 1
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= limit:
            raise SpecError(f"{name}: config.json has {key} = {v!r}; expected an integer in [{low}, {limit}].")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if cfg.get(k) is None]
    if cfg.get("kv_lora_rank"):
        missing += [k for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim") if cfg.get(k) is None]
    if cfg.get("intermediate_size") is None and cfg.get("moe_intermediate_size") is None:
        missing.append("intermediate_size")
    if missing:
        raise SpecError(f"{name}: config.json lacks {missing}; the planner needs hidden_size, num_hidden_layers, "
                        "num_attention_heads, vocab_size and intermediate_size (and the MLA head sizes with "
                        "kv_lora_rank).")
    if cfg.get("head_dim") is None \
            and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise SpecError(f"{name}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                        f"{cfg['num_attention_heads']} and no head_dim is given.")


def spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """Describe a model from a config.json dict (transformers' field names)."""
    _check_sizes(cfg, name)
    try:
        D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
        H = cfg["num_attention_heads"]
        vocab = cfg["vocab_size"]
    except KeyError as e:
        raise SpecError(f"{name}: config.json lacks {e}; the planner needs hidden_size, num_hidden_layers, "
                        "num_attention_heads and vocab_size.") from e
    fam = _family(cfg)
    KV = _get(cfg, "num_key_value_heads", default=H)
    hd = _get(cfg, "head_dim", default=D // H)
    ffn = _get(cfg, "intermediate_size")
    n_exp = _get(cfg, "num_experts", "n_routed_experts", "num_local_experts", default=0)
    k_exp = _get(cfg, "num_experts_per_tok", default=0)
    moe_ffn = _get(cfg, "moe_intermediate_size", default=ffn)
    shared = _get(cfg, "n_shared_experts", default=0)
    dense_first = _get(cfg, "first_k_dense_replace", default=0)
    kv_lora = _get(cfg, "kv_lora_rank")
    items: list[Item] = []
    for layer in range(L):
        p = f"model.layers.{layer}."
        if kv_lora:  # MLA (DeepSeek-V2/V3): low-rank q and a compressed KV latent that is what gets cached
            rope, nope, vdim = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            qr = cfg.get("q_lora_rank")
            if qr:
                items += [Item(p + "self_attn.q_a_proj.weight", layer, "q_a", (qr, D)),
                          Item(p + "self_attn.q_b_proj.weight", layer, "q_b", (H * (nope + rope), qr))]
            else:
                items.append(Item(p + "self_attn.q_proj.weight", layer, "q", (H * (nope + rope), D)))
            items += [Item(p + "self_attn.kv_a_proj_with_mqa.weight", layer, "kv_a", (kv_lora + rope, D)),
                      Item(p + "self_attn.kv_b_proj.weight", layer, "kv_b", (H * (nope + vdim), kv_lora)),
                      Item(p + "self_attn.o_proj.weight", layer, "o", (D, H * vdim))]
        elif fam is not None and len(fam.qkv) == 1:  # q, k, v in one tensor (Phi-3)
            items += [Item(f"{p}{fam.qkv[0]}.weight", layer, "qkv", ((H + 2 * KV) * hd, D)),
                      Item(p + "self_attn.o_proj.weight", layer, "o", (D, H * hd))]
        else:
            items += [Item(p + "self_attn.q_proj.weight", layer, "q", (H * hd, D)),
                      Item(p + "self_attn.k_proj.weight", layer, "k", (KV * hd, D)),
                      Item(p + "self_attn.v_proj.weight", layer, "v", (KV * hd, D)),
                      Item(p + "self_attn.o_proj.weight", layer, "o", (D, H * hd))]
        sparse = layer >= dense_first and (fam is None or fam.moe is None or fam.moe.is_moe_layer(_Cfg(cfg), layer))
        if n_exp and sparse:
            e = p + "mlp.experts."
            items += [Item(e + "gate_proj", layer, "expert_gate", (moe_ffn, D), n_exp, k_exp, n_exp),
                      Item(e + "up_proj", layer, "expert_up", (moe_ffn, D), n_exp, k_exp, n_exp),
                      Item(e + "down_proj", layer, "expert_down", (D, moe_ffn), n_exp, k_exp, n_exp),
                      Item(p + "mlp.gate.weight", layer, "router", (n_exp, D))]
            if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert behind a sigmoid gate
                sf = cfg["shared_expert_intermediate_size"]
                items += [Item(p + "mlp.shared_expert.gate_proj.weight", layer, "gate", (sf, D)),
                          Item(p + "mlp.shared_expert.up_proj.weight", layer, "up", (sf, D)),
                          Item(p + "mlp.shared_expert.down_proj.weight", layer, "down", (D, sf)),
                          Item(p + "mlp.shared_expert_gate.weight", layer, "router", (1, D))]
            if shared:
                sf = moe_ffn * shared
                items += [Item(p + "mlp.shared_experts.gate_proj.weight", layer, "gate", (sf, D)),
                          Item(p + "mlp.shared_experts.up_proj.weight", layer, "up", (sf, D)),
                          Item(p + "mlp.shared_experts.down_proj.weight", layer, "down", (D, sf))]
        elif fam is not None and len(fam.gate_up) == 1:  # gate and up in one tensor (Phi-3)
            items += [Item(f"{p}{fam.gate_up[0]}.weight", layer, "gate_up", (2 * ffn, D)),
                      Item(f"{p}{fam.down}.weight", layer, "down", (D, ffn))]
        else:
            if ffn is None:
                raise SpecError(f"{name}: config.json lacks intermediate_size")
            items += [Item(p + "mlp.gate_proj.weight", layer, "gate", (ffn, D)),
                      Item(p + "mlp.up_proj.weight", layer, "up", (ffn, D)),
                      Item(p + "mlp.down_proj.weight", layer, "down", (D, ffn))]
    tied = bool(cfg.get("tie_word_embeddings", False))
    items.append(Item("model.embed_tokens.weight", None, "embed", (vocab, D)))
    if not tied:
        items.append(Item("lm_head.weight", None, "head", (vocab, D)))
    kv_elems = (kv_lora + cfg["qk_rope_head_dim"]) if kv_lora else 2 * KV * hd
    return ModelSpec(name, cfg.get("model_type", "?"), L, D, H, KV, hd, vocab, tied, kv_elems, tuple(items),
                     norm_params=_small_params(cfg, fam, L, D, H, KV, hd), source=cfg.get("_source", ""),
                     max_ctx=int(cfg.get("max_position_embeddings") or 8192))


class _Cfg:
    """A config.json dict read as attributes (what the family helpers take)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    def __getattr__(self, name):
        return None


def _family(cfg: dict):
    """The model's Family where tightfit has one (the planner also describes families it cannot run)."""
    from ..models.families import families

    model_type = cfg.get("model_type")
    return families().get(model_type) if isinstance(model_type, str) else None


def _small_params(cfg: dict, fam, L: int, D: int, H: int, KV: int, hd: int) -> int:
    """Norm gains and biases: per layer the family's norms (q/k norms are head_dim wide) and q/k/v biases
    (Qwen2; attention_bias elsewhere), plus the final norm."""
    if fam is None:
        return (2 * L + 1) * D
    widths = {fam.q_norm: H * hd if fam.qk_norm_full else hd, fam.k_norm: KV * hd if fam.qk_norm_full else hd}
    per_layer = sum(widths.get(n, D) for n in fam.norms)
    if fam.qkv_bias or cfg.get("attention_bias"):
        per_layer += (H + 2 * KV) * hd + (D if cfg.get("attention_bias") else 0)
    return L * per_layer + D


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_spec(source: str) -> ModelSpec:
    """A shipped config name, a config.json path, a model folder, a GGUF file or a known model name."""
    if source in shipped_configs():
        return spec_from_config(json.loads((CONFIGS / f"{source}.json").read_text()), source)
    p = Path(source)
    if p.suffix == ".json" and p.is_file():
        return spec_from_config(json.loads(p.read_text()), p.stem)
    if p.is_dir() and (p / "config.json").is_file():
        return spec_from_config(json.loads((p / "config.json").read_text()), p.name)
    from ..models import resolve_source

    path, kind = resolve_source(source)  # typed errors for anything else
    from transformers import AutoConfig

    from ..models.gguf_file import hf_config

    config = hf_config(path, tokenizer=False)[0] if kind == "gguf" else AutoConfig.from_pretrained(path)
    return spec_from_config(config.to_dict(), source)
