"""The reference forward of a LazyModel run one decoder layer at a time over many windows.

Calibration, the mixed-precision sensitivities and `eval --base` all need a model's exact fp32 function on
many windows, but never the whole model at once: a layer is read (dequantized from the GGUF memory map or
read from safetensors), applied to every window's hidden states, and dropped before the next is read. Peak
memory is one layer plus the windows' activations, whatever the model's size.
"""

from __future__ import annotations

import torch

from .families import family_of
from .lazy import LazyModel


def check_layered(config, verb: str):
    """The model's Family (every family runs layer by layer); a typed error for an unknown one."""
    return family_of(config, verb)


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


class Positions:
    """What a decoder layer needs besides its input for windows of ctx tokens: its layer type's RoPE tables
    (by transformers' own rotary module: this is the reference the runtime is checked against) and attention
    mask (None: causal; a sliding-window layer shorter than ctx gets a boolean band)."""

    def __init__(self, lazy: LazyModel, ctx: int, dtype: torch.dtype = torch.float32):
        import inspect

        fam = family_of(lazy.config)
        rope = type(lazy.skeleton.model.rotary_emb)(config=lazy.config)
        x, pos = torch.zeros(1, ctx, 1), torch.arange(ctx)[None]
        typed = "layer_type" in inspect.signature(rope.forward).parameters
        self.types = fam.layer_types(lazy.config)
        windows = dict(zip(self.types, fam.windows(lazy.config)))
        self.pe, self.masks = {}, {}
        for kind in set(self.types):
            cs = rope(x, pos, kind) if typed else rope(x, pos)
            self.pe[kind] = tuple(t.to(dtype) for t in cs)
            w = windows[kind]
            if w and w < ctx:
                q, k = torch.arange(ctx)[:, None], torch.arange(ctx)[None]
                self.masks[kind] = ((k <= q) & (q - k < w))[None, None]
            else:
                self.masks[kind] = None

    def of(self, i: int):
        kind = self.types[i]
        return self.pe[kind], self.masks[kind]


def rotary(lazy: LazyModel, ctx: int, dtype: torch.dtype = torch.float32) -> Positions:
    return Positions(lazy, ctx, dtype)


def layer_call(layer, x: torch.Tensor, pe: Positions) -> torch.Tensor:
    b = x.shape[0]
    (cos, sin), mask = pe.of(layer.self_attn.layer_idx)
    return layer(x, attention_mask=mask, position_embeddings=(cos.expand(b, -1, -1), sin.expand(b, -1, -1)))


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


def embed(lazy: LazyModel, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
          table: torch.Tensor | None = None) -> torch.Tensor:
    """The input embeddings of token ids, with the family's scale (Gemma: sqrt(hidden))."""
    from .families import embed_scale_value

    table = lazy.get("model.embed_tokens.weight") if table is None else table
    xs = table[tokens].to(dtype)
    s = embed_scale_value(family_of(lazy.config), lazy.config)
    return xs if s == 1.0 else xs.mul_(torch.tensor(s, dtype=dtype))


def head_weight(lazy: LazyModel) -> torch.Tensor:
    tied = lazy.config.tie_word_embeddings
    return lazy.get("model.embed_tokens.weight" if tied else "lm_head.weight")


def hidden_states(lazy: LazyModel, tokens: torch.Tensor, keep_from: int = 0, progress: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Final-normed hidden states [windows, ctx - keep_from, hidden] of token windows [windows, ctx]."""
    from tqdm.auto import tqdm

    check_layered(lazy.config, "this model's reference forward")
    xs = embed(lazy, tokens, dtype)
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
