"""Decode and prefill speed of tightfit's runtime vs llama.cpp, same machine, same run, interleaved.

For each GGUF (default: the shipped SmolLM2 Q4_1 file, whose Q4_1 / Q8_0 codes both engines run as stored),
after a warm-up, for 1 and 2 threads, `--repeats` times with the engine order alternating:
  - prefill: the same 512 token IDs (the evaluation text's first 512) in one batch into an empty KV cache;
  - decode: 128 single-token steps after that 512-token prompt (prefilled, untimed), batch 1, no sampling cost,
    so each step attends over 512-640 cached positions (--decode-from-empty: llama-bench's tg128, from position 0).
llama.cpp is driven through llama-cpp-python's low-level llama_decode (no per-token Python of the high-level
wrapper). Both keep the KV cache in 16 bits (llama.cpp f16, tightfit bf16). Reports min and median tok/s,
the ratio tightfit / llama.cpp, weight bytes read per token and the fraction of the measured memory bandwidth
(bytes per token x tokens/s / bandwidth). Writes bench/results/speed.json.
Usage: python bench/speed.py [--gguf FILE ...] [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
PREFILL, DECODE = 512, 128


def bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Read bandwidth, bytes/s: the best of `reps` sums over a 1 GiB fp32 array."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Ours:
    name = "tightfit"

    def __init__(self, path: Path):
        from tightfit.runtime.load import load_engine

        self.engine, self.tok, _, _ = load_engine(path)
        self.bytes_per_token = self.engine.weight_bytes()["per_token"]

    def prefill(self, ids: list[int], threads: int) -> float:
        torch.set_num_threads(threads)
        cache = self.engine.new_cache(1, PREFILL + DECODE)
        t = torch.tensor([ids])
        return _timed(lambda: self.engine.forward(t, 0, cache))

    def decode(self, ids: list[int], threads: int) -> float:
        torch.set_num_threads(threads)
        cache = self.engine.new_cache(1, PREFILL + DECODE)
        start = len(ids) - DECODE
        if start:
            self.engine.forward(torch.tensor([ids[:start]]), 0, cache)
        toks = [torch.tensor([[i]]) for i in ids[start:]]

        def run():
            for pos, tk in enumerate(toks, start):
                self.engine.forward(tk, pos, cache)[0, -1].argmax()
        return _timed(run)


class Llama:
    name = "llama.cpp"

    def __init__(self, path: Path):
        import gguf
        import llama_cpp as L

        from tightfit.eval.llama_cpp import check_build

        check_build()
        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, user: None)  # kept alive: llama.cpp holds it
        L.llama_log_set(self._quiet, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = PREFILL + DECODE, PREFILL, PREFILL
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.batch = L.llama_batch_init(PREFILL, 0, 1)
        self.bytes_per_token = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    def _decode(self, ids: list[int], start: int) -> None:
        b = self.batch
        b.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == len(ids) - 1
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        self.L.llama_get_logits_ith(self.ctx, -1)

    def _fresh(self, threads: int) -> None:
        self.L.llama_set_n_threads(self.ctx, threads, threads)
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prefill(self, ids: list[int], threads: int) -> float:
        self._fresh(threads)
        return _timed(lambda: (self._decode(ids, 0), self.L.llama_synchronize(self.ctx)))

    def decode(self, ids: list[int], threads: int) -> float:
        self._fresh(threads)
        start = len(ids) - DECODE
        if start:
            self._decode(ids[:start], 0)
            self.L.llama_synchronize(self.ctx)

        def run():
            for pos, tok in enumerate(ids[start:], start):
                self._decode([tok], pos)
            self.L.llama_synchronize(self.ctx)
        return _timed(run)


def summarize(times: list[float], n: int) -> dict:
    rates = sorted(n / t for t in times)
    return {"tok_s_min": rates[0], "tok_s_median": statistics.median(rates), "tok_s_max": rates[-1], "runs": rates}


def bench_file(path: Path, ids: list[int], threads: list[int], repeats: int, bw: dict, decode_ids: list[int]) -> dict:
    engines = [Ours(path), Llama(path)]
    for e in engines:  # warm-up
        e.prefill(ids, max(threads))
        e.decode(decode_ids, max(threads))
    times = {(e.name, t, k): [] for e in engines for t in threads for k in ("prefill", "decode")}
    for r in range(repeats):
        for t in threads:
            order = engines if r % 2 == 0 else engines[::-1]
            for k in ("decode", "prefill"):
                for e in order:
                    times[(e.name, t, k)].append(getattr(e, k)(ids if k == "prefill" else decode_ids, t))
    out = {"file": str(path), "bytes_per_token": {e.name: e.bytes_per_token for e in engines}, "threads": {},
           "resident_weight_bytes": {"tightfit": engines[0].bytes_per_token, "file": path.stat().st_size}}
    for t in threads:
        row = {}
        for k, n in (("decode", DECODE), ("prefill", PREFILL)):
            row[k] = {e.name: summarize(times[(e.name, t, k)], n) for e in engines}
            ours, peer = row[k]["tightfit"], row[k]["llama.cpp"]
            row[k]["ratio_median"] = ours["tok_s_median"] / peer["tok_s_median"]
            row[k]["ratio_min"] = ours["tok_s_min"] / peer["tok_s_min"]
        row["decode_roofline_fraction"] = {e.name: e.bytes_per_token * row["decode"][e.name]["tok_s_median"] / bw[t]
                                           for e in engines}
        out["threads"][t] = row
        print(f"{path.name} {t} thread(s): decode {row['decode']['tightfit']['tok_s_median']:.1f} vs "
              f"{row['decode']['llama.cpp']['tok_s_median']:.1f} tok/s ({row['decode']['ratio_median']:.2f}x); prefill "
              f"{row['prefill']['tightfit']['tok_s_median']:.0f} vs {row['prefill']['llama.cpp']['tok_s_median']:.0f} "
              f"({row['prefill']['ratio_median']:.2f}x)", file=sys.stderr)
    return out


def main() -> int:
    from tightfit.data import EVALUATION, read_part
    from tightfit.models import resolve_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", nargs="*", help="GGUF files (default: the shipped SmolLM2-135M Q4_1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    ap.add_argument("--decode-from-empty", action="store_true", help="decode from position 0 (llama-bench's tg128)")
    args = ap.parse_args()
    files = [Path(f) for f in args.gguf] if args.gguf else [resolve_source("smollm2-135m")[0]]
    bw = {t: bandwidth(t) for t in args.threads}
    print("read bandwidth GB/s:", {t: round(b / 1e9, 1) for t, b in bw.items()}, file=sys.stderr)
    ours_tok = Ours(files[0]).tok
    text_ids = ours_tok(read_part(EVALUATION))["input_ids"]
    ids = text_ids[:PREFILL]
    decode_ids = text_ids[:DECODE] if args.decode_from_empty else text_ids[:PREFILL + DECODE]
    result = {"bandwidth_bytes_s": bw, "prefill_tokens": PREFILL, "decode_tokens": DECODE, "kv": "16-bit",
              "decode_after": len(decode_ids) - DECODE, "torch": torch.__version__,
              "files": [bench_file(f, ids, args.threads, args.repeats, bw, decode_ids) for f in files]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
