"""Recently prefilled rows, kept so that a later newcomer group does not run the same row again.

In a packed eval the requests of one sample arrive over several admission rounds, and the unmitigated prompt
is the main row of every logits-level system (none, VCD, M3ID, AGLA, INTER) and a branch row of others; within
one group ``Batch`` already runs such a repeat once. This store carries the rows across groups: by content
(tokens, positions, pixels, backend; see ``Batch._row_digests``), each row's keys and values without padding and
its last logits, least recently used first out, bounded in bytes. A scheduler owns one (``Scheduler.recent``),
so the weights cannot change under it; only forwards that nothing can tell apart (no plan edit, hook or
statistics) read or write it. The bytes are outside the scheduler's ``max_tokens`` (KV columns in flight);
``RecentRows(max_bytes=0)`` keeps nothing. A reused row's keys were computed beside other padding, so they can
differ from a fresh run's in the last bits (as any row's do between batches of other shapes).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

RECENT_ROWS_BYTES = 64 * 2**20  # about 130 prompts of the demo model; rows larger than this are not kept

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, tokens, head_dim]


class RecentRows:
    """An LRU of prefilled rows by content digest: (per-layer keys and values, last logits)."""

    def __init__(self, max_bytes: int = RECENT_ROWS_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._rows: OrderedDict[bytes, tuple[Layers, torch.Tensor, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, digest: bytes) -> tuple[Layers, torch.Tensor] | None:
        found = self._rows.get(digest)
        if found is None:
            return None
        self._rows.move_to_end(digest)
        self.hits += 1
        return found[0], found[1]

    def put(self, digest: bytes, layers: Layers, logits: torch.Tensor) -> None:
        size = logits.nbytes + sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes or digest in self._rows:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, _, old) = self._rows.popitem(last=False)
            self.bytes -= old
        self._rows[digest] = (layers, logits, size)
        self.bytes += size

    def clear(self) -> None:
        self._rows.clear()
        self.bytes = 0
