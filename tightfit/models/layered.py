"""The reference forward of a LazyModel run one decoder layer at a time over many windows.

Calibration, the mixed-precision sensitivities and `eval --base` all need a model's exact fp32 function on
many windows, but never the whole model at once: a layer is read (dequantized from the GGUF memory map or
read from safetensors), applied to every window's hidden states, and dropped before the next is read. Peak
memory is one layer plus the windows' activations, whatever the model's size.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedArchitectureError
from .lazy import LazyModel

LAYERED = ("llama", "qwen2")  # decoder layers called as layer(x, attention_mask=None, position_embeddings=pe)


def check_layered(config, verb: str) -> None:
    if config.model_type not in LAYERED:
        raise UnsupportedArchitectureError(
            f"{verb} runs the model layer by layer, which tightfit knows for model types {list(LAYERED)}; "
            f"got {config.model_type!r}.")


def load_layer(lazy: LazyModel, i: int, state: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Decoder layer i with its weights (read from the source unless `state` holds them)."""
    from ..io import release_freed_memory_eagerly

    release_freed_memory_eagerly()  # else glibc's heap keeps every dropped layer's pages
    prefix = f"model.layers.{i}."
    state = lazy.materialize(prefix) if state is None else state
    layer = lazy.skeleton.model.layers[i]
    layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True, assign=True)  # no copy
    return layer.to(dtype)


def drop_layer(lazy: LazyModel, i: int) -> None:
    from ..io import return_free_heap

    lazy.skeleton.model.layers[i].to("meta")
    return_free_heap()  # the small tensors a layer's pass allocated and freed


def rotary(lazy: LazyModel, ctx: int, dtype: torch.dtype = torch.float32):
    """(cos, sin) for positions 0 .. ctx-1, batch 1."""
    rope = type(lazy.skeleton.model.rotary_emb)(config=lazy.config)
    x = torch.zeros(1, ctx, 1)
    return tuple(t.to(dtype) for t in rope(x, torch.arange(ctx)[None]))


def layer_call(layer, x: torch.Tensor, pe) -> torch.Tensor:
    b = x.shape[0]
    return layer(x, attention_mask=None, position_embeddings=(pe[0].expand(b, -1, -1), pe[1].expand(b, -1, -1)))


def run_layer(layer, xs: torch.Tensor, pe, batch: int = 8, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer over every window of xs [windows, ctx, hidden], `batch` windows per call (no autograd)."""
    out = torch.empty_like(xs) if out is None else out
    with torch.inference_mode():
        for b in range(0, xs.shape[0], batch):
            out[b : b + batch] = layer_call(layer, xs[b : b + batch], pe)
    return out


def final_norm(lazy: LazyModel) -> torch.nn.Module:
    norm = lazy.skeleton.model.norm
    norm.to_empty(device="cpu")
    norm.load_state_dict({"weight": lazy.get("model.norm.weight")})
    return norm.float()


def head_weight(lazy: LazyModel) -> torch.Tensor:
    tied = lazy.config.tie_word_embeddings
    return lazy.get("model.embed_tokens.weight" if tied else "lm_head.weight")


def hidden_states(lazy: LazyModel, tokens: torch.Tensor, keep_from: int = 0, progress: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Final-normed hidden states [windows, ctx - keep_from, hidden] of token windows [windows, ctx]."""
    from tqdm.auto import tqdm

    check_layered(lazy.config, "this model's reference forward")
    xs = lazy.get("model.embed_tokens.weight")[tokens].to(dtype)
    pe = rotary(lazy, tokens.shape[1], dtype)
    spare = torch.empty_like(xs)
    for i in tqdm(range(lazy.config.num_hidden_layers), desc="reference forward", unit="layer", disable=not progress):
        layer = load_layer(lazy, i, dtype=dtype)
        xs, spare = run_layer(layer, xs, pe, out=spare), xs
        drop_layer(lazy, i)
    del spare
    norm = final_norm(lazy)
    with torch.inference_mode():
        h = norm(xs[:, keep_from:].float())
    lazy.skeleton.model.norm.to("meta")
    return h
