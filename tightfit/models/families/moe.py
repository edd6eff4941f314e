"""Mixture-of-experts families: Mixtral (top-2, renormalized), Qwen3-MoE and OLMoE (top-k, gates renormalized
where norm_topk_prob says so), Qwen2-MoE (plus a shared expert behind a sigmoid gate).

transformers 5 holds a layer's experts as two 3-D parameters (mlp.experts.gate_up_proj [E, 2F, D] and
mlp.experts.down_proj [E, D, F]); checkpoints, vLLM and tightfit's artifacts hold one 2-D tensor per expert.
tightfit names each expert's tensors `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen's
checkpoint names), quantizes each as its own tensor with statistics from the tokens routed to it, and builds the
3-D parameters only to run transformers' layer as the reference."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import Family, llama_pairs

PROJ = ("gate_proj", "up_proj", "down_proj")
EXPERT = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class MoE:
    """How a family's MoE block is named and routed."""

    ckpt_block: str = "mlp"  # the block's name in checkpoints (Mixtral: block_sparse_moe)
    ckpt_proj: dict = field(default_factory=lambda: {p: p for p in PROJ})  # Mixtral: w1 / w3 / w2
    shared: bool = False  # Qwen2-MoE: mlp.shared_expert (a dense MLP) scaled by sigmoid(mlp.shared_expert_gate)
    always_normalize: bool = False  # Mixtral renormalizes the top-k gates whatever the config says

    @staticmethod
    def n_experts(config) -> int:
        return getattr(config, "num_local_experts", None) or config.num_experts

    @staticmethod
    def top_k(config) -> int:
        return config.num_experts_per_tok

    @staticmethod
    def ffn(config) -> int:
        return getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    def normalize(self, config) -> bool:
        return self.always_normalize or bool(getattr(config, "norm_topk_prob", False))

    def is_moe_layer(self, config, i: int) -> bool:
        """Qwen2-MoE may run some layers with a dense MLP (mlp_only_layers, decoder_sparse_step)."""
        only = getattr(config, "mlp_only_layers", None)
        if isinstance(only, (list, tuple)) and i in only:
            return False
        step = getattr(config, "decoder_sparse_step", 1)
        return not isinstance(step, int) or step < 1 or (i + 1) % step == 0

    # ---- names ----
    def expert_name(self, prefix: str, e: int, proj: str) -> str:
        return f"{prefix}mlp.experts.{e}.{proj}.weight"

    def from_checkpoint(self, key: str) -> str:
        """A checkpoint tensor name -> tightfit's (experts per tensor, Qwen's names; the router as mlp.gate)."""
        if self.ckpt_block != "mlp":
            key = key.replace(f".{self.ckpt_block}.", ".mlp.")
        for proj, ck in self.ckpt_proj.items():
            if ck != proj:
                key = re.sub(rf"(\.experts\.\d+\.){ck}\.weight$", rf"\g<1>{proj}.weight", key)
        return key

    def to_checkpoint(self, name: str) -> str:
        m = EXPERT.match(name)
        if m:
            name = f"{m.group(1)}mlp.experts.{m.group(2)}.{self.ckpt_proj[m.group(3)]}.weight"
        return name.replace(".mlp.", f".{self.ckpt_block}.") if self.ckpt_block != "mlp" else name

    # ---- transformers' 3-D parameters <-> one tensor per expert ----
    def unstack(self, state: dict, prefix: str, config) -> dict[str, torch.Tensor]:
        """One 2-D view per expert tensor of a layer's 3-D parameters (no copy)."""
        F = self.ffn(config)
        gu, down = state[f"{prefix}mlp.experts.gate_up_proj"], state[f"{prefix}mlp.experts.down_proj"]
        out = {}
        for e in range(gu.shape[0]):
            out[self.expert_name(prefix, e, "gate_proj")] = gu[e, :F]
            out[self.expert_name(prefix, e, "up_proj")] = gu[e, F:]
            out[self.expert_name(prefix, e, "down_proj")] = down[e]
        return out


class MoEFamily(Family):
    """A dense family's attention with an MoE block in place of the MLP."""

    @property
    def shared_groups(self) -> tuple[tuple[str, ...], ...]:
        if self.moe.shared:
            return (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
        return ()

    def layer_groups(self, config, i: int):
        if not self.moe.is_moe_layer(config, i):
            return self.groups
        return (self.qkv, (self.o,)) + self.shared_groups

    # llama.cpp renormalizes the top-k gates by architecture, not by a config flag (llama-model.cpp build_moe_ffn)
    GGUF_NORM = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}

    def check_export(self, config, target):
        from ...errors import UnsupportedArchitectureError

        super().check_export(config, target)
        if target != "gguf":
            return
        if self.moe.normalize(config) != self.GGUF_NORM[self.gguf_arch]:
            raise UnsupportedArchitectureError(
                f"llama.cpp's {self.gguf_arch} architecture {'always' if self.GGUF_NORM[self.gguf_arch] else 'never'} "
                f"renormalizes the top-k expert gates, but this config's norm_topk_prob says otherwise: the GGUF "
                "would compute another function.")
        if self.qk_norm_full and config.num_key_value_heads != config.num_attention_heads:
            raise UnsupportedArchitectureError(
                f"llama.cpp's {self.gguf_arch} architecture sizes the k norm as the hidden size (no grouped-query "
                f"attention); this config has {config.num_key_value_heads} kv heads for {config.num_attention_heads}.")
        dense = [i for i in range(config.num_hidden_layers) if not self.moe.is_moe_layer(config, i)]
        if dense:
            raise UnsupportedArchitectureError(
                f"layers {dense[:5]} have a dense MLP (mlp_only_layers / decoder_sparse_step); llama.cpp's "
                f"{self.gguf_arch} architecture expects experts in every layer.")

    def gguf_metadata(self, w, config):
        super().gguf_metadata(w, config)
        w.add_expert_count(self.moe.n_experts(config))
        w.add_expert_used_count(self.moe.top_k(config))
        if self.gguf_arch != "llama":
            w.add_expert_feed_forward_length(self.moe.ffn(config))
        if self.moe.shared:
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)

    @staticmethod
    def gguf_expert_name(i: int, proj: str) -> str:
        return f"blk.{i}.ffn_{proj.removesuffix('_proj')}_exps.weight"


def _moe_family(name, model_types, gguf_arch, moe: MoE, **kw) -> MoEFamily:
    # AWQ rescales attention's two pairs only: the norm before an MoE block feeds the router too, and each
    # expert's up -> down pair would need a scale per expert
    return MoEFamily(name, model_types, gguf_arch, pairs=llama_pairs()[:2], moe=moe,
                     limits=("AWQ rescales the attention pairs only", "mixed precision (sensitivities) not yet",
                             "GGUF and compressed-tensors export not yet", "experts stream with their layer"), **kw)


MIXTRAL = _moe_family("mixtral", ("mixtral",), "llama", MoE("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                                                                  "down_proj": "w2"},
                                                             always_normalize=True), permute_qk=True)
QWEN3_MOE = _moe_family("qwen3_moe", ("qwen3_moe",), "qwen3moe", MoE(), q_norm="self_attn.q_norm",
                        k_norm="self_attn.k_norm")
QWEN2_MOE = _moe_family("qwen2_moe", ("qwen2_moe",), "qwen2moe", MoE(shared=True), qkv_bias=True,
                        gguf_output_required=True)

# OLMoE: q/k norms over all heads at once, gates not renormalized (norm_topk_prob false)
OLMOE = _moe_family("olmoe", ("olmoe",), "olmoe", MoE(), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                    qk_norm_full=True, gguf_output_required=True)

FAMILIES = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE)
