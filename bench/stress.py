"""`tightfit serve` under hostile load: 64 concurrent clients on loopback, mixing well-formed requests with
clients that disconnect mid-stream, slow readers, 100 MB bodies (chunked, no Content-Length: refused as they
arrive), deeply nested JSON and requests at the limits. Checks: every well-formed request succeeds, every
malformed one gets a 4xx with an OpenAI-style body, the server stays healthy, and its memory returns to its
baseline (VmRSS after warm-up vs after the storm). Writes bench/results/stress.json.

    python bench/stress.py [--model smollm2-135m] [--clients 64] [--requests 2] [--parallel 4] [--rounds 3]

tests/test_server.py runs it at CI size (a tiny model, 16 clients, one round).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load_test import free_port, wait_healthy  # noqa: E402

HERE = Path(__file__).parent
KINDS = ("plain", "stream", "plain", "stream", "disconnect", "slow_reader", "nested", "limits")


def rss(pid: int) -> int:
    return next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))


def body(prompt, stream=False, n=32) -> dict:
    return {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}


def one(base: str, kind: str, ids: list[int], rng: random.Random) -> tuple[str, str]:
    """(kind, outcome): outcome 'ok' when the server did what it should for this kind of request."""
    prompt = ids[:rng.randint(20, 300)]
    with httpx.Client(timeout=600) as c:
        if kind in ("plain", "stream"):
            if kind == "plain":
                r = c.post(base + "/v1/completions", json=body(prompt))
                return kind, "ok" if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32 else f"{r.status_code}"
            with c.stream("POST", base + "/v1/completions", json=body(prompt, True)) as r:
                done = any(line == "data: [DONE]" for line in r.iter_lines())
            return kind, "ok" if r.status_code == 200 and done else f"{r.status_code}"
        if kind == "disconnect":  # read three chunks, then drop the connection
            with c.stream("POST", base + "/v1/completions", json=body(prompt, True, 128)) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i >= 3:
                        break
            return kind, "ok"
        if kind == "slow_reader":  # a stream read a line every 50 ms
            with c.stream("POST", base + "/v1/completions", json=body(prompt, True)) as r:
                lines = 0
                for _ in r.iter_lines():
                    lines += 1
                    time.sleep(0.05)
            return kind, "ok" if r.status_code == 200 and lines > 32 else f"{r.status_code}"
        if kind == "nested":  # 100k nested arrays as the prompt: a 4xx, not a crash
            depth = 100_000
            raw = '{"model": "m", "max_tokens": 4, "prompt": ' + "[" * depth + "]" * depth + "}"
            r = c.post(base + "/v1/completions", content=raw, headers={"content-type": "application/json"})
            return kind, "ok" if 400 <= r.status_code < 500 and "error" in r.json() else f"{r.status_code}"
        if kind == "limits":  # max_tokens over the server's limit: 400 naming the field
            r = c.post(base + "/v1/completions", json=body(prompt, n=10 ** 6))
            return kind, "ok" if r.status_code == 400 and "max_tokens" in r.text else f"{r.status_code}"
        if kind == "oversized":  # 100 MB in 1 MB chunks without a Content-Length
            def chunks():
                yield b'{"model": "m", "prompt": "'
                for _ in range(100):
                    yield b"a" * (1 << 20)
                yield b'"}'
            try:
                r = c.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
                return kind, "ok" if r.status_code == 413 else f"{r.status_code}"
            except httpx.HTTPError:  # the server answered 413 and closed while the upload was still going
                return kind, "ok"
    raise ValueError(kind)


def main() -> int:
    from tightfit.data import EVALUATION, read_part
    from tightfit.models import resolve_source
    from tightfit.models.lazy import lazy_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="what to serve (a name, GGUF, HF folder or artifact)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--only", choices=KINDS + ("oversized",), help="every request of this kind (to find a leak)")
    ap.add_argument("--rounds", type=int, default=3, help="storms in a row (RSS after each is reported)")
    ap.add_argument("--out", default=str(HERE / "results" / "stress.json"))
    args = ap.parse_args()
    path, kind = resolve_source(args.model)
    if kind == "gguf":
        tokenizer = lazy_gguf(Path(path)).tokenizer
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(read_part(EVALUATION)[:20000])["input_ids"]
    source = str(path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tightfit.cli", "serve", source, "--name", "m", "--port", str(port),
                             "--ctx", "1024", "--max-tokens-limit", "256", "--max-queue", "512", "--parallel",
                             str(args.parallel)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    outcomes, lock = Counter(), threading.Lock()
    try:
        wait_healthy(base, proc)
        for _ in range(3):  # warm-up: kernels, allocator, one of each path
            one(base, "plain", ids, random.Random(0))
            one(base, "stream", ids, random.Random(0))
        baseline = rss(proc.pid)

        def client(k: int):
            rng = random.Random(k)
            for j in range(args.requests):
                kind = "oversized" if (k, j) in ((0, 0), (21, 1), (42, 0), (63, 1)) else KINDS[(k + j) % len(KINDS)]
                kind = args.only or kind
                try:
                    res = one(base, kind, ids, rng)
                except Exception as e:  # noqa: BLE001  (a client-side failure is an outcome to count)
                    res = (kind, f"client {type(e).__name__}")
                with lock:
                    outcomes[res] += 1

        peak, rounds = baseline, []
        for _ in range(args.rounds):  # growth that stops after the first round is retention, not a leak
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss(proc.pid))
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            time.sleep(5)
            rounds.append(round(rss(proc.pid) / 1e6, 1))
        healthy = httpx.get(base + "/health", timeout=10).status_code == 200
        after = rss(proc.pid)
        # a last well-formed request after the storm
        last = one(base, "plain", ids, random.Random(1))[1] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)
    table = {f"{k} -> {o}": n for (k, o), n in sorted(outcomes.items())}
    res = {"clients": args.clients, "requests_per_client": args.requests, "parallel": args.parallel,
           "wall_s": round(wall, 1), "outcomes": table, "all_ok": all(o == "ok" for (_, o) in outcomes),
           "healthy_after": healthy, "request_after_ok": last, "rss_baseline_mb": round(baseline / 1e6, 1),
           "rss_peak_mb": round(peak / 1e6, 1), "rss_after_mb": round(after / 1e6, 1),
           "rss_growth_mb": round((after - baseline) / 1e6, 1), "rss_after_each_round_mb": rounds}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["all_ok"] and healthy and last else 1


if __name__ == "__main__":
    raise SystemExit(main())
