"""Typed quantization config: what `quantize_` and `tightfit quantize` carry out."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import QuantizeError
from ..formats.weight import WeightFormat

# awq-gptq: AWQ's activation-aware scales folded in, then GPTQ's rounding (as llm-compressor's AWQ + GPTQ recipe)
METHODS = ("rtn", "gptq", "awq", "hqq", "awq-gptq")
CALIBRATED = ("gptq", "awq", "awq-gptq")
SCALED = ("awq", "awq-gptq")  # methods that search and fold per-channel scales
GPTQ_METHODS = ("gptq", "awq-gptq")  # methods that round with GPTQ


_EXPERT = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "gptq"
    fmt: WeightFormat = WeightFormat(4, 32, False)
    # the token embedding and (tied) output head: llama.cpp keeps them at 8 bits at this model size
    embed_fmt: WeightFormat | None = WeightFormat(8, 32, True)
    # the output head's own format (None: as embed_fmt); a tied table is the head too and takes it. An untied
    # embedding is only looked up (a row per token), the head is read whole every token: llama.cpp's Q4_K_M keeps
    # them at Q4_K and Q6_K
    head_fmt: WeightFormat | None = None
    tensor_formats: dict[str, WeightFormat] = field(default_factory=dict)  # a mixed plan: name -> format
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    clip_search: bool = True  # GPTQ: each group's range searched (clipped) by its output error, not min/max
    calib_samples: int = 128
    # the share of calibration windows a calibrated method does not fit: each tensor's result is checked on
    # them against round-to-nearest's, and RTN's is kept where it is better (0: no check)
    holdout: float = 0.125
    calib_ctx: int = 512
    # the share of calibration windows the model writes itself (quant/selfgen.py): the shipped text is one
    # domain (speeches), a code or chat model is used on others
    calib_generated: float = 0.25
    seed: int = 0
    # dtype of the calibration forward passes (statistics are accumulated in fp32/fp64 either way); "auto":
    # bf16 where the CPU multiplies it in hardware (2-4x fp32 with AVX-512 BF16), else fp32 (an AVX2-only CPU
    # runs torch's bf16 GEMMs 4-100x slower than fp32)
    calib_dtype: str = "auto"
    predicted_kld: float | None = None  # a mixed plan's predicted KL divergence (nats/token)

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantizeError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 <= self.calib_generated < 1:
            raise QuantizeError(f"the generated share of the calibration must be in [0, 1); got "
                                f"{self.calib_generated}. Pass e.g. --calib-generated 0.25 (0: text only).")

    @property
    def calib_torch_dtype(self):
        import torch

        if self.calib_dtype == "auto":
            from ..runtime.kernels import compute_dtype

            return compute_dtype()
        return getattr(torch, self.calib_dtype)

    def held_out_windows(self, windows: int) -> int:
        if self.method == "rtn" or self.holdout <= 0 or windows < 2:
            return 0
        return min(windows - 1, max(1, round(windows * self.holdout)))

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED

    def format_for(self, name: str) -> WeightFormat | None:
        """The format of one tensor: the plan's entry, else the embedding format or the default. None: keep."""
        if name in self.tensor_formats:
            return self.tensor_formats[name]
        m = _EXPERT.match(name)  # one expert's tensor: its layer's group format, where a plan gives one
        if m and f"{m.group(1)}mlp.experts.{m.group(2)}" in self.tensor_formats:
            return self.tensor_formats[f"{m.group(1)}mlp.experts.{m.group(2)}"]
        if name == "lm_head.weight" and self.head_fmt is not None:
            return self.head_fmt
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return self.embed_fmt or self.fmt
        return self.fmt

    def head_format(self, tied: bool) -> WeightFormat | None:
        """The output head's format. A tied table is the head too: its plan entry, else head_fmt, else embed_fmt."""
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        if tied and name not in self.tensor_formats and self.head_fmt is not None:
            return self.head_fmt
        return self.format_for(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fmt"] = self.fmt.name
        d["embed_fmt"] = self.embed_fmt.name if self.embed_fmt else None
        d["head_fmt"] = self.head_fmt.name if self.head_fmt else None
        d["tensor_formats"] = {k: v.name if v else "keep" for k, v in self.tensor_formats.items()}
        return d
