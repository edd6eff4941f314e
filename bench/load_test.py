"""Load test of `tightfit serve` (and, with --peer, llama.cpp's llama-server on the same GGUF file, and vLLM's CPU
build on the same weights in bf16, since it runs no GGUF on CPUs): for each
number of concurrent clients, R requests per client on loopback, half of them streaming.

Prompts are 50-500 tokens of the evaluation text (token IDs sent as the prompt, so lengths are exact), 64-128
new tokens each (ignore_eos). Per client count and server: errors, latency p50/p99, time to first token and
inter-token latency p50/p99 (streams), aggregate generated tokens/s. Servers alternate per client count, so
both see the same machine state. Writes bench/results/load_test.json.

    python bench/load_test.py --clients 1,4,16,32 --requests 4 --parallel 4 [--peer llama-server,vllm]
"""

from __future__ import annotations

import argparse
import json
import os
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


def one_request(base: str, model: str, prompt: list[int], stream: bool, new_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    t0 = time.perf_counter()
    first, times = None, []
    with httpx.Client(timeout=900) as c:
        if not stream:
            r = c.post(base + "/v1/completions", json=body)
            ok = r.status_code == 200
            n = r.json()["usage"]["completion_tokens"] if ok else 0
        else:
            body["stream_options"] = {"include_usage": True}
            n, usage, ok = 0, None, False
            with c.stream("POST", base + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = r.status_code == 200
                        break
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        now = time.perf_counter()
                        first = first if first is not None else now - t0
                        times.append(now)
                        n += 1
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
            n = usage if usage is not None else n
    itl = [b - a for a, b in zip(times, times[1:])]
    return {"ok": ok and n == new_tokens, "latency": time.perf_counter() - t0, "ttft": first, "itl": itl,
            "tokens": n, "stream": stream, "prompt_tokens": len(prompt)}


def pct(xs: list[float], q: float):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def wait_healthy(base: str, proc) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def hf_folder(gguf: str) -> str:
    """The GGUF's weights as a bf16 Hugging Face folder (vLLM's CPU build runs no GGUF), made once in the cache."""
    cache = Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit")) / "load-test-hf"
    if not (cache / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tightfit.cli", "convert", gguf, "--dtype", "bfloat16", "-o", str(cache),
                        "--force"], check=True, capture_output=True)
    return str(cache)


def start_server(kind: str, gguf: str, parallel: int, ctx: int):
    port = free_port()
    env = None
    if kind == "tightfit":
        cmd = [sys.executable, "-m", "tightfit.cli", "serve", gguf, "--name", "m", "--port", str(port),
               "--ctx", str(ctx), "--max-tokens-limit", "256", "--max-queue", "512", "--parallel", str(parallel)]
    elif kind == "vllm":  # vLLM's CPU build in its own venv (bench/make_vllm_venv.sh), on the same weights in bf16
        py = subprocess.run(["bash", str(HERE / "make_vllm_venv.sh")], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_folder(gguf), "--served-model-name", "m",
               "--port", str(port), "--max-num-seqs", str(parallel), "--max-model-len", str(ctx),
               "--dtype", "bfloat16"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    else:  # llama.cpp's server, built from the llama-cpp-python sdist (bench/build_llama_tools.sh)
        bin_dir = subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
        cmd = [f"{bin_dir}/llama-server", "-m", gguf, "--port", str(port), "--parallel", str(parallel),
               "-c", str(ctx * parallel), "-t", "2", "--cont-batching", "--alias", "m", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc)
    return proc, base


def load(base: str, ids: list[int], clients: int, requests: int, seed: int) -> dict:
    results, lock = [], threading.Lock()

    def client(k: int):
        crng = random.Random(seed * 1000 + k)
        for j in range(requests):
            n = crng.randint(50, 500)
            start = crng.randint(0, len(ids) - n)
            r = one_request(base, "m", ids[start:start + n], (k + j) % 2 == 0, crng.randint(64, 128))
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "requests": len(results), "errors": sum(not r["ok"] for r in results),
            "wall_s": round(wall, 2), "generated_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99), "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99), "itl_p50_ms": 1e3 * (pct(itl, 0.5) or 0),
            "itl_p99_ms": 1e3 * (pct(itl, 0.99) or 0)}


def main() -> int:
    from tightfit.data import EVALUATION, read_part
    from tightfit.models import resolve_source
    from tightfit.models.lazy import lazy_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrent client counts")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--parallel", type=int, default=4, help="slots of both servers")
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--peer", default="none", help="comma-separated peers: llama-server, vllm")
    ap.add_argument("--tightfit-parallel", default=None, help="also run tightfit with these other --parallel values")
    ap.add_argument("--out", default=str(HERE / "results" / "load_test.json"))
    args = ap.parse_args()
    gguf = str(resolve_source("smollm2-135m")[0])
    ids = lazy_gguf(Path(gguf)).tokenizer(read_part(EVALUATION))["input_ids"]
    servers = [("tightfit", args.parallel)] + [("tightfit", int(p)) for p in (args.tightfit_parallel or "").split(",") if p]
    servers += [(p, args.parallel) for p in args.peer.split(",") if p != "none"]
    rows = []
    for i, clients in enumerate(int(c) for c in args.clients.split(",")):
        order = servers if i % 2 == 0 else servers[::-1]
        for kind, parallel in order:
            proc, base = start_server(kind, gguf, parallel, args.ctx)
            try:
                row = {"server": kind, "parallel": parallel} | load(base, ids, clients, args.requests, i)
            finally:
                proc.terminate()
                proc.wait(30)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"model": gguf, "new_tokens": "64-128", "prompt_tokens": "50-500", "requests_per_client": args.requests,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
