"""Continuous batching: one worker thread runs every active sequence's decode step at once (the weights are read
once per step for all of them), admits a waiting sequence as soon as a slot frees, and interleaves chunked
prefill with decoding so a long prompt does not stall the others.

Each of `parallel` slots owns a KV cache of `ctx` positions. A slot remembers the tokens its last sequence left in
its cache, and a new sequence takes the free slot that shares the longest prefix with its prompt (a system
prompt, a chat history): that prefix is not computed again (prefix caching).

Per iteration: admit, drop cancelled sequences, run one prefill chunk of the prefilling sequence with the fewest
prompt tokens left (a short prompt is not held behind a long one, and every prompt done sooner starts decoding
sooner: round robin made each of 4 prompts that came together wait for all 4), then one decode step of every
decoding sequence. Tokens are chosen by `generate.Decoder`, the code a request
alone uses, so a sequence's tokens do not depend on its neighbours (up to the kernels' numerics: a single
sequence takes the fused decode kernel, several take the batched linears).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import torch

from .generate import Decoder

PREFILL_CHUNK = 256


class Sequence:
    """A request in the batcher. `emit` receives each Step, then None at the end, or an exception."""

    def __init__(self, prompt_ids: list[int], decoder: Decoder, emit: Callable):
        self.ids, self.dec, self.emit = list(prompt_ids), decoder, emit
        self.slot: int | None = None
        self.pos = 0  # positions of this sequence already in its slot's cache
        self.next_token: int | None = None
        self.cancelled = False


class Batcher:
    def __init__(self, engine, parallel: int = 4, ctx: int = 2048, prefill_chunk: int = PREFILL_CHUNK,
                 on_batch: Callable[[int], None] | None = None):
        self.engine, self.parallel, self.ctx, self.chunk = engine, parallel, ctx, prefill_chunk
        self.caches = [None] * parallel  # made on first use of each slot
        self.slot_tokens: list[list[int]] = [[] for _ in range(parallel)]
        self.free = list(range(parallel))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.on_batch = on_batch or (lambda n: None)
        self.stats = {"steps": 0, "rows": 0, "prefill_tokens": 0, "reused_tokens": 0}
        self.thread = threading.Thread(target=self._loop, name="tightfit-batch", daemon=True)
        self.thread.start()

    # ---- called from other threads ----
    def submit(self, seq: Sequence) -> None:
        with self.cv:
            self.waiting.append(seq)
            self.cv.notify()

    def cancel(self, seq: Sequence) -> None:
        with self.cv:
            seq.cancelled = True
            self.cv.notify()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(10)

    # ---- the worker ----
    def _admit(self) -> None:
        while self.free and self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.emit(None)
                continue
            # the free slot whose cached tokens share the longest prefix with this prompt
            shared, best = max((_common(self.slot_tokens[s], seq.ids), s) for s in self.free)
            self.free.remove(best)
            seq.slot = best
            seq.pos = min(shared, len(seq.ids) - 1)  # at least one token to prefill: its logits start decoding
            self.stats["reused_tokens"] += seq.pos
            self.slot_tokens[best] = self.slot_tokens[best][: seq.pos]
            if self.caches[best] is None:
                self.caches[best] = self.engine.new_cache(1, self.ctx)
            self.active.append(seq)

    def _release(self, seq: Sequence, end=None) -> None:
        self.active.remove(seq)
        self.free.append(seq.slot)
        seq.emit(end)

    def _emit_step(self, seq: Sequence, logits: torch.Tensor) -> None:
        step = seq.dec.step(logits)
        seq.emit(step)
        if seq.dec.finished:
            self._release(seq)
        else:
            seq.next_token = step.token

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.active:
                    self.cv.wait()
                if self.stopping:
                    for seq in self.active + list(self.waiting):
                        seq.emit(RuntimeError("the server is shutting down"))
                    return
                self._admit()
                for seq in [s for s in self.active if s.cancelled]:
                    self._release(seq)
            prefilling = [s for s in self.active if s.next_token is None]
            if prefilling:
                self._prefill(min(prefilling, key=lambda s: len(s.ids) - s.pos))
            decoding = [s for s in self.active if s.next_token is not None and not s.cancelled]
            if decoding:
                self._decode(decoding)

    def _prefill(self, seq: Sequence) -> None:
        cache = self.caches[seq.slot]
        end = min(seq.pos + self.chunk, len(seq.ids))
        try:
            logits = self.engine.forward(torch.tensor([seq.ids[seq.pos:end]]), seq.pos, cache)[0, -1]
            self.slot_tokens[seq.slot] += seq.ids[seq.pos:end]
            self.stats["prefill_tokens"] += end - seq.pos
            seq.pos = end
            if end == len(seq.ids):
                self._emit_step(seq, logits)
        except Exception as e:  # this sequence fails; the others go on
            self._release(seq, e)

    def _decode(self, rows: list[Sequence]) -> None:
        self.on_batch(len(rows))
        try:
            logits = self.engine.decode_rows([s.next_token for s in rows], [s.pos for s in rows],
                                             [self.caches[s.slot] for s in rows])
        except Exception as e:
            for s in rows:
                self._release(s, e)
            return
        self.stats["steps"] += 1
        self.stats["rows"] += len(rows)
        for b, s in enumerate(rows):
            self.slot_tokens[s.slot].append(s.next_token)
            s.pos += 1
            try:
                self._emit_step(s, logits[b])
            except Exception as e:
                self._release(s, e)


def off_main_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) run in a thread that then exits: its result, or its exception raised here.

    The server loads its model this way. libgomp (torch's OpenMP runtime, which the kernels share) gives each
    thread that opens parallel regions a team of its own, and once the threads it manages outnumber the CPUs it
    barely spins between regions. A team left in the main thread by the load, beside the batch thread's, did that
    on 2 cores: ~230 context switches a token and 33 ms a token instead of 19 (bench/README.md). A thread's team
    goes when the thread exits."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="tightfit-load", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)  # in steps, so that Ctrl-C reaches the main thread
    if "error" in box:
        raise box["error"]
    return box["result"]


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
