"""Load test of `tightfit serve`: N concurrent clients x R requests on loopback, half of them streaming.

Prompts are 50-500 tokens of the evaluation text (token IDs sent as the prompt, so lengths are exact), 64 new
tokens each (ignore_eos). Reports errors, p50/p99 latency, time to first token for streams, and aggregate
generated tokens/s. The server queues requests (one generation at a time), so latency grows with the queue.
Writes bench/results/load_test.json. Usage: python bench/load_test.py [--clients 32] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(base: str, prompt: list[int], stream: bool, new_tokens: int) -> dict:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    first = None
    with httpx.Client(timeout=600) as c:
        if not stream:
            r = c.post(base + "/v1/completions", json=body)
            ok = r.status_code == 200
            n = r.json()["usage"]["completion_tokens"] if ok else 0
        else:
            body["stream_options"] = {"include_usage": True}
            n, ok = 0, False
            with c.stream("POST", base + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = r.status_code == 200
                        break
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
    return {"ok": ok and n == new_tokens, "latency": time.perf_counter() - t0, "ttft": first, "tokens": n,
            "stream": stream, "prompt_tokens": len(prompt)}


def main() -> int:
    from tightfit.data import EVALUATION, read_part
    from tightfit.models import resolve_source
    from tightfit.models.lazy import lazy_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "load_test.json"))
    args = ap.parse_args()
    tok = lazy_gguf(resolve_source("smollm2-135m")[0]).tokenizer
    ids = tok(read_part(EVALUATION))["input_ids"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tightfit.cli", "serve", "smollm2-135m", "--port", str(port),
                               "--ctx", "1024", "--max-tokens-limit", "128", "--max-queue", "256"])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        results, lock = [], threading.Lock()

        def client(k: int):
            crng = random.Random(k)
            for j in range(args.requests):
                n = crng.randint(50, 500)
                start = crng.randint(0, len(ids) - n)
                r = one_request(base, ids[start:start + n], (k + j) % 2 == 0, args.new_tokens)
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    out = {"clients": args.clients, "requests_per_client": args.requests, "new_tokens": args.new_tokens,
           "requests": len(results), "errors": sum(not r["ok"] for r in results), "wall_s": wall,
           "latency_p50_s": statistics.median(lat), "latency_p99_s": lat[int(0.99 * (len(lat) - 1))],
           "ttft_p50_s": statistics.median(ttft) if ttft else None,
           "generated_tokens_per_s": sum(r["tokens"] for r in results) / wall,
           "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in results) / wall,
           "scheduling": "FIFO queue, one generation at a time (batch 1)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
