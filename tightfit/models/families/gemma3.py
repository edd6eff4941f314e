"""Gemma 3 (text): four RMSNorms per layer with (1 + w) gains (a sandwich around attention and the MLP), q/k
RMSNorm, GELU-tanh MLP, embeddings scaled by sqrt(hidden), attention scaled by query_pre_attn_scalar^-1/2,
sliding-window layers with their own RoPE base between full-attention layers."""

from ...errors import UnsupportedArchitectureError
from . import Family, llama_pairs


class Gemma3(Family):
    def embed_scale(self, config):
        return config.hidden_size ** 0.5

    def attn_scale(self, config):
        return config.query_pre_attn_scalar ** -0.5

    def check_export(self, config, target):
        super().check_export(config, target)
        if target == "gguf":
            # llama.cpp derives Gemma 3's attention scale from the shapes: 1/sqrt(head_dim), or 1/sqrt(hidden/heads)
            # for its 27B type (llama-model.cpp); a config whose query_pre_attn_scalar is neither would run wrong
            hd, per_head = self.head_dim(config), config.hidden_size // config.num_attention_heads
            if config.query_pre_attn_scalar not in (hd, per_head):
                raise UnsupportedArchitectureError(
                    f"query_pre_attn_scalar {config.query_pre_attn_scalar} is neither head_dim ({hd}) nor "
                    f"hidden/heads ({per_head}); llama.cpp cannot express that attention scale.")
            types = self.layer_types(config)
            pattern = [i for i, t in enumerate(types) if t == "full_attention"]
            if any(p % 6 != 5 for p in pattern):
                raise UnsupportedArchitectureError(
                    "llama.cpp runs Gemma 3 with every 6th layer full attention; this config's layer_types "
                    f"(full at {pattern}) differ.")


GEMMA3 = Gemma3(
    "gemma3", ("gemma3_text",), "gemma3",
    mlp_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
    norm_offset=1.0, act="gelu_tanh", gguf_swa=True, pairs=llama_pairs(mlp_norm="pre_feedforward_layernorm"),
)

FAMILIES = (GEMMA3,)
