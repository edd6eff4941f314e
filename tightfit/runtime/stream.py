"""A weight budget: units (decoder layers, the output head) that do not stay resident are written once to an
unlinked scratch file and read back, one unit at a time, into a single reusable arena every token. The
embedding is read row by row from the same file. Reads are plain preads into the arena, not an mmap, so the
process's resident memory stays at the budget whatever the page cache holds.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ..errors import MemoryBudgetError
from ..quant.core import QuantizedWeight

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def tensor_slots(obj) -> list[tuple[object, str]]:
    """(owner, attribute) of every tensor a runtime unit holds (a Layer, a RuntimeLinear or a Concat)."""
    from .linear import RuntimeLinear
    from .linear import Concat
    from .model import Layer

    if isinstance(obj, Layer):  # an MoE layer's routed experts are units of their own (Streamer.store_layer)
        slots = [(obj, n) for n in obj.norms()]
        if obj.moe is not None:
            slots += [(obj.moe, "router")] + ([(obj.moe, "shared_gate")] if obj.moe.shared_gate is not None else [])
        for lin in obj.linears(experts=False):
            slots += tensor_slots(lin)
        return slots
    if isinstance(obj, (list, tuple)):  # one expert: its gate/up and down
        return [s for lin in obj for s in tensor_slots(lin)]
    if isinstance(obj, Concat):
        return [s for p in obj.parts for s in tensor_slots(p)] + ([(obj, "bias")] if obj.bias is not None else [])
    if isinstance(obj, RuntimeLinear):
        return [(obj, a) for a in ("weight", "scales_zeros", "scale_codes", "bias", "perm") if getattr(obj, a) is not None]
    raise TypeError(type(obj))


def unit_bytes(obj) -> int:
    return sum(_align(getattr(o, a).numel() * getattr(o, a).element_size()) for o, a in tensor_slots(obj))


def choose_resident(sizes: dict, budget: int, share: dict | None = None) -> tuple[set, int]:
    """Which units stay resident so that resident bytes + the arena (the largest streamed unit) fit the budget,
    streaming the fewest bytes per token. share[k]: the fraction of tokens that read unit k (an expert:
    top_k / experts; else 1): units read by every token are kept first. Returns (resident keys, arena bytes)."""
    share = share or {}
    best = None
    for arena in sorted({0, *sizes.values()}):
        must = {k for k, s in sizes.items() if s > arena}
        room = budget - arena - sum(sizes[k] for k in must)
        if room < 0:
            continue
        keep = set(must)
        for k in sorted((k for k in sizes if k not in must), key=lambda k: (-share.get(k, 1.0), -sizes[k])):
            if sizes[k] <= room:
                keep.add(k)
                room -= sizes[k]
        if len(keep) == len(sizes):
            arena = 0
        streamed = sum(s * share.get(k, 1.0) for k, s in sizes.items() if k not in keep)
        if best is None or streamed < best[2]:
            best = (keep, arena, streamed)
    if best is None:
        big = max(sizes, key=sizes.get)
        what = (f"layer {big}" if isinstance(big, int) else f"expert {big[2]} of layer {big[1]}"
                if big[0] == "expert" else "a slice of the output head")
        raise MemoryBudgetError(f"a weight budget of {_size(budget)} is too small: streaming needs room for "
                                f"the largest unit, {what}, of {_size(sizes[big])}. Raise --max-memory to at "
                                f"least {_size(sizes[big])}, or quantize to fewer bits.")
    return best[0], best[1]


class Streamer:
    """Every unit is written to the scratch file as it is built (so building holds one unit at a time); then
    `place` reads back the units that stay resident and points the others into the shared arena."""

    def __init__(self, directory: str | None = None):
        from ..io import release_freed_memory_eagerly

        release_freed_memory_eagerly()  # freed layer buffers go back to the OS, so RSS tracks what is live
        self.file = tempfile.TemporaryFile(dir=directory, prefix="tightfit-stream-")  # noqa: SIM115 unlinked: gone on exit
        self.fd = self.file.fileno()
        self.end = 0
        self.units: dict[object, tuple[int, int, list]] = {}  # key -> (file offset, bytes, slots)
        self.share: dict[object, float] = {}  # key -> fraction of tokens reading it (experts)
        self.streamed: dict[object, tuple[int, int]] = {}
        self.arena: torch.Tensor | None = None
        self.current = None
        self.bytes_per_token = 0
        self.resident_bytes = 0
        self.reads = 0

    def _write(self, t: torch.Tensor) -> int:
        off = self.end
        data = memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())
        os.pwrite(self.fd, data, off)
        self.end = _align(off + len(data))
        return off

    def store_layer(self, i: int, layer) -> None:
        """A decoder layer as a unit, and each routed expert of an MoE layer as a unit of its own (fetched only
        when a token is routed to it)."""
        self.store(i, layer)
        if layer.moe is not None:
            for e, pair in enumerate(layer.moe.experts):
                self.store(("expert", i, e), pair, layer.moe.top_k / len(layer.moe.experts))

    def store(self, key, unit, share: float = 1.0) -> None:
        """Write a unit's tensors to the file and drop them from memory until `place`."""
        self.share[key] = share
        start, slots = self.end, []
        for owner, attr in tensor_slots(unit):
            t = getattr(owner, attr)
            off = self._write(t)
            slots.append((owner, attr, off - start, t.numel() * t.element_size(), t.dtype, tuple(t.shape)))
            setattr(owner, attr, t.new_empty(0))
        self.units[key] = (start, self.end - start, slots)

    def place(self, budget: int) -> None:
        sizes = {k: n for k, (_, n, _) in self.units.items()}
        keep, arena = choose_resident(sizes, budget, self.share)
        self.arena = torch.empty(max(arena, ALIGN), dtype=torch.uint8)
        for key, (start, n, slots) in self.units.items():
            if key in keep:
                buf = torch.empty(n, dtype=torch.uint8)
                self._read(buf, start, n)
                self.resident_bytes += n
            else:
                buf = self.arena
                self.streamed[key] = (start, n)
                self.bytes_per_token += int(n * self.share.get(key, 1.0))
            for owner, attr, off, nb, dtype, shape in slots:
                setattr(owner, attr, buf[off:off + nb].view(dtype).view(shape))

    def _read(self, buf: torch.Tensor, off: int, n: int) -> None:
        got = os.preadv(self.fd, [memoryview(buf[:n].numpy())], off)
        if got != n:
            raise OSError(f"short read of the streamed weights ({got} of {n} bytes)")

    def fetch(self, key) -> None:
        region = self.streamed.get(key)
        if region is None or self.current == key:
            return
        self._read(self.arena, *region)
        self.current, self.reads = key, self.reads + region[1]

    def close(self) -> None:
        self.file.close()


class StreamedHead:
    """The output head cut into row slices (each about one layer's size), fetched one at a time."""

    def __init__(self, streamer: Streamer, parts: list):
        self.s, self.parts = streamer, parts
        self.added_error = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ys = []
        for j, part in enumerate(self.parts):
            self.s.fetch(("head", j))
            ys.append(part(x))
        return torch.cat(ys, -1)


class DiskEmbedding:
    """Embedding rows read from the scratch file per lookup; only the rows asked for are ever in memory."""

    def __init__(self, streamer: Streamer, table: QuantizedWeight | torch.Tensor):
        self.s = streamer
        if isinstance(table, QuantizedWeight):
            self.fmt, self.in_features, self.g_idx = table.fmt, table.in_features, table.g_idx
            parts = [table.packed_bytes, table.scales] + ([table.mins] if table.mins is not None else [])
        else:
            self.fmt = None
            parts = [table.to(torch.bfloat16)]
        self.parts = [(self.s._write(p), p.shape[1] * p.element_size(), p.dtype, p.shape[1]) for p in parts]
        self.nbytes = 0

    def _rows(self, ids: list[int]) -> list[torch.Tensor]:
        out = []
        for off, row_bytes, dtype, width in self.parts:
            buf = bytearray(row_bytes * len(ids))
            mv = memoryview(buf)
            for j, i in enumerate(ids):
                os.preadv(self.s.fd, [mv[j * row_bytes:(j + 1) * row_bytes]], off + i * row_bytes)
            out.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(len(ids), width))
        return out

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self._rows(tokens.reshape(-1).tolist())
        if self.fmt is None:
            return rows[0].float().view(*tokens.shape, -1)
        qw = QuantizedWeight(self.fmt, rows[0], rows[1], rows[2] if len(rows) > 2 else None, self.g_idx,
                             in_features=self.in_features, packed=True)
        return qw.dequantize().view(*tokens.shape, -1)
