"""Calibration windows written by the model itself.

The shipped calibration text is one domain (speeches). A code or chat model is used on other text, and a
calibrated method that fits only speeches fits directions that text never excites; mixing in samples the model
generates covers the distribution it is deployed on (LLM-QAT's data-free generation, Liu et al. 2023, and the
self-generated calibration of several GPTQ/AWQ recipes). Each window is packed from whole conversations: a short
instruction from a fixed, domain-diverse list through the model's chat template, then the model's own sampled
answer (temperature 1, top-p 0.95); when an answer ends, the next conversation starts in the same window. All
windows are generated together, one token per window per step, on tightfit's runtime (float layers rounded to
8-bit codes as they load, a GGUF's quantized ones as they are), so the cost is `ctx` batched decode steps.
Results are cached per source file, window count, length and seed under ~/.cache/tightfit/calib.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .. import chat_template

# instructions across the domains a general or code model serves; the model writes the text that follows
PROMPTS = (
    "Write a Python function that merges two sorted lists, with a docstring and a short test.",
    "Explain how a hash table handles collisions.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
    "Translate into French and German: 'The train leaves at seven, so we should eat early.'",
    "Solve step by step: a rectangle's perimeter is 54 cm and its length is twice its width. Find its area.",
    "Write a SQL query that finds the five customers with the highest total order value.",
    "Give me a packing list for a three-day hiking trip in the mountains.",
    "Write a JavaScript function that debounces another function, and explain when to use it.",
    "Summarize the plot of a classic novel of your choice in one paragraph.",
    "Write a bash script that renames every .jpeg file in a folder to .jpg.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a C function that reverses a singly linked list.",
    "Draft a polite email asking a colleague to review a document by Friday.",
    "List the pros and cons of remote work as a table in Markdown.",
    "Write a Rust program that counts the words in a text file.",
    "What is the difference between a process and a thread?",
    "Write a haiku about autumn, then explain its imagery.",
    "Implement binary search in Java and state its time complexity.",
    "Describe the water cycle, with its main stages as a numbered list.",
    "Write a regular expression that matches ISO 8601 dates and explain each part.",
    "Give three tips for writing clear documentation.",
    "Write a Python class for a bank account with deposit, withdraw and a history of transactions.",
    "Explain what a derivative is, with an example.",
)
SAMPLING = {"temperature": 1.0, "top_p": 0.95}
FORMAT = 3  # bump when the generation changes, so cached windows are not reused


def cache_dir() -> Path:
    return Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit")) / "calib"


def _source_key(path: Path) -> str:
    """Identity of a model source (file or folder) by its files' names, sizes and modification times."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def conversation(tokenizer, prompt: str) -> list[int]:
    """Token ids that open one conversation: the instruction in the chat template, or as plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = chat_template.render(tokenizer, [{"role": "user", "content": prompt}])
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt + "\n\n", add_special_tokens=False)["input_ids"]


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of fp32 logits [B, V], with the runtime's own temperature and top-p filtering."""
    from ..runtime.sampling import SamplingParams, filter_logits

    probs = torch.softmax(filter_logits(logits, SamplingParams(**SAMPLING)), -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def generate_windows(engine, tokenizer, n: int, ctx: int, seed: int = 0, progress: bool = False,
                     batch: int = 16) -> torch.Tensor:
    """[n, ctx] token ids, each window packed with conversations the model writes (see the module's doc)."""
    from tqdm.auto import tqdm

    from ..runtime.generate import _eos_ids

    eos = _eos_ids(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, ctx, dtype=torch.long)
    bar = tqdm(total=n * ctx, desc="generating calibration", unit="tok", unit_scale=True, disable=not progress)
    for b0 in range(0, n, batch):
        B = min(batch, n - b0)
        order = torch.randperm(len(PROMPTS), generator=gen).tolist()
        queues = [conversation(tokenizer, PROMPTS[order[(b0 + j) % len(order)]]) for j in range(B)]
        turn = [1] * B
        cache = engine.new_cache(B, ctx)
        token = torch.tensor([q.pop(0) for q in queues])
        for pos in range(ctx):
            out[b0:b0 + B, pos] = token
            if pos == ctx - 1:
                break
            logits = engine.forward(token[:, None], pos, cache)[:, -1]
            drawn = _draw(logits, gen)
            nxt = []
            for j in range(B):
                if queues[j]:  # still reading its instruction
                    nxt.append(queues[j].pop(0))
                    continue
                t = int(drawn[j])
                if t in eos:  # the answer ended: the next conversation follows in the same window
                    queues[j] = conversation(tokenizer, PROMPTS[order[(b0 + j + turn[j] * B) % len(order)]])
                    turn[j] += 1
                nxt.append(t)
            token = torch.tensor(nxt)
            bar.update(B)
        bar.update(B)
    bar.close()
    return out


def _weight_budget(kind: str, path: Path) -> int | None:
    """None (every weight resident) where that fits in half the free memory, else half the free memory: the
    runtime streams the other layers from disk each step (slower, bounded)."""
    from ..memory import available_bytes
    from ..runtime.load import resident_estimate

    half = available_bytes() // 2
    return None if resident_estimate(kind, path) <= half else half


def generated_windows(source, n: int, ctx: int, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """`n` generated windows of `ctx` tokens for a model source (cached; generated on first use)."""
    from ..formats.weight import WeightFormat
    from ..io import atomic_path, write_json
    from ..models import resolve_source
    from ..runtime.load import load_engine

    path, kind = resolve_source(source)
    path = Path(path).resolve()
    key = f"{_source_key(path)}-n{n}-ctx{ctx}-s{seed}-v{FORMAT}"
    file = cache_dir() / f"{key}.pt"
    if file.exists():
        try:
            ids = torch.load(file, weights_only=True)
            if tuple(ids.shape) == (n, ctx):
                return ids
        except (OSError, RuntimeError, EOFError):
            pass  # a corrupt cache entry is regenerated
    # float layers (an HF folder, a float GGUF) on 8-bit codes (llama.cpp's Q8_0 grid): a batched step on the int8
    # kernel, not bf16 GEMMs; text sampled at temperature 1 does not feel the error 8-bit rounding leaves (~40 dB)
    engine, tokenizer, _, _ = load_engine(source, progress=progress, max_memory=_weight_budget(kind, path),
                                          round_dense=WeightFormat.parse("sym8-g32"))
    ids = generate_windows(engine, tokenizer, n, ctx, seed, progress)
    del engine
    with atomic_path(file, directory=False, force=True) as tmp:
        torch.save(ids, tmp)
    write_json(file.with_suffix(".json"), {"source": str(path), "n": n, "ctx": ctx, "seed": seed, "sampling": SAMPLING,
                                           "prompts": len(PROMPTS)})
    return ids
