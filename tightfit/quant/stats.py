"""What calibration collects from a layer's forward: each linear's input Hessian E[x x^T] (HessianHook) and the
rows an MoE layer routes to each expert (RoutedInputs), kept apart for the windows a method fits and the
held-out ones; read by quantization (calibrate.py) and the mixed-precision sensitivities (sensitivity.py)."""

from __future__ import annotations

import torch


# columns per block of the fp32 Hessian's upper triangle (CPUs without bf16 in hardware, or fp32 calibration)
TRIANGLE_BLOCK = 1024


class HessianHook:
    """E[x x^T] of one linear's inputs, summed apart for the windows a method fits (part 0) and the held-out
    windows its result is checked on (part 1). fp32 sums accumulated in place (fp64 doubled the largest
    buffers: a 7B down_proj's is 18944^2).

    bf16 inputs (the default calibration dtype) go to the AMX kernel where the CPU has one (runtime/kernels/
    gram.cpp: bf16 products, fp32 sums, the upper triangle only; 3-4x the fp32 GEMM), else to the AVX-512 BF16
    one (gram_avx.cpp, the same sums); elsewhere fp32 GEMMs over the upper triangle's column blocks. torch's own
    bf16 GEMM is not used: it rounds each call's sum to bf16, and on a 1.5B Qwen2's layer 1 (massive
    activations) that made the Hessians indefinite (Cholesky needed 10-100x the damping)."""

    def __init__(self, n: int):
        from ..runtime.kernels import hessian_library

        self.H = [torch.zeros(n, n), torch.zeros(n, n)]
        self.tokens = [0, 0]
        self.part = 0
        self.gram = hessian_library() if n % 32 == 0 else None
        self.upper = False  # H holds only its upper triangle (the bf16 kernels' and the blocked GEMMs' output)

    def __call__(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        if self.gram is not None and x.dtype == torch.bfloat16:
            from ..runtime.kernels import gram_into

            gram_into(self.gram, self.H[self.part], x)
            self.upper = True
        else:
            x = x.float()
            H, n = self.H[self.part], x.shape[1]
            if n >= 2 * TRIANGLE_BLOCK:  # the upper triangle only, in column blocks: 56% of the products at 8960
                for i in range(0, n, TRIANGLE_BLOCK):
                    j = min(i + TRIANGLE_BLOCK, n)
                    H[i:j, i:].addmm_(x[:, i:j].T, x[:, i:])
                self.upper = True
            else:
                H.addmm_(x.T, x)
        self.tokens[self.part] += x.shape[0]

    def result(self, part: int = 0) -> torch.Tensor | None:
        if not self.tokens[part]:
            return None
        H = self.H[part]
        if self.upper:
            H = H.triu() + H.triu(1).T
        return H / self.tokens[part]


class RoutedInputs:
    """The inputs an MoE layer routes to each of its experts (a forward pre-hook on transformers' experts module,
    whose arguments are the block's input rows and each row's top-k expert indices), kept apart in two parts:
    the fit windows (part 0) and the held-out ones (part 1), set by the caller, or with `alternate` one window
    per call alternating between them (as the sensitivities' SplitHessian). With `keep_all`, also every row
    entering the block (the fallback of an expert that sees too few)."""

    def __init__(self, n_experts: int, alternate: bool = False, keep_all: bool = True):
        self.rows = [[[] for _ in range(n_experts)], [[] for _ in range(n_experts)]]
        self.all = [[], []]
        self.part, self.alternate, self.keep_all, self.calls = 0, alternate, keep_all, 0

    def __call__(self, module, args):
        x, idx = args[0].float(), args[1]
        part = self.calls % 2 if self.alternate else self.part
        self.calls += 1
        if self.keep_all:
            self.all[part].append(x)
        for e in range(len(self.rows[0])):
            sel = (idx == e).any(-1)
            if sel.any():
                self.rows[part][e].append(x[sel])

    def inputs(self, e: int | None, part: int) -> torch.Tensor | None:
        xs = self.all[part] if e is None else self.rows[part][e]
        return torch.cat(xs) if xs else None


def gram(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or not len(x) else (x.T @ x) / x.shape[0]
