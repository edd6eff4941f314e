"""Phi-3 / Phi-3.5 / Phi-4-mini: q, k, v stored as one qkv_proj and gate/up as one gate_up_proj (gate rows
first), partial rotary where the config says so. The fused tensors are kept as they are: one linear each, as
llama.cpp's phi3 architecture stores them too."""

from . import Family, ScalePair


class Phi3(Family):
    def check_export(self, config, target):
        super().check_export(config, target)
        from ...errors import UnsupportedArchitectureError

        if target == "gguf" and self.rotary_dim(config) != self.head_dim(config):
            raise UnsupportedArchitectureError(
                "partial rotary embeddings (Phi-4-mini) are not written to GGUF by tightfit yet; export to "
                "compressed-tensors (vLLM) instead.")


PHI3 = Phi3(
    "phi3", ("phi3",), "phi3", gguf_swa=True, qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",),
    # v and up are row ranges of the fused tensors: only the norm -> linear pairs are rescaled
    pairs=(ScalePair("attn_in", "input_layernorm", ("self_attn.qkv_proj",)),
           ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_up_proj",))),
    limits=("AWQ rescales 2 of the 4 pairs (v -> o and up -> down are row ranges of fused tensors)",
            "longrope (128k variants): the short factors, exact up to original_max_position_embeddings"),
)

FAMILIES = (PHI3,)
