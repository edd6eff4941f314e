"""Llama (1-3.x, rope scaling "llama3" included) and Mistral: RMSNorm, q/k/v and gate/up, SiLU MLP. llama.cpp
keeps their q/k rows interleaved for its rotary layout; Mistral's sliding window (when set) applies to every
layer."""

from . import Family

LLAMA = Family("llama", ("llama",), "llama", permute_qk=True)
MISTRAL = Family("mistral", ("mistral",), "llama", permute_qk=True)

FAMILIES = (LLAMA, MISTRAL)
