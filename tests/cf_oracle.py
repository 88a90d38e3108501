"""The counterfactual draws re-implemented from their documented definitions (docs/kernels.md,
"Counterfactual draws"), in plain Python integers: no code of ``clearsight.kernels`` is used, so the kernel
oracle (tests/kernels/oracle.py) and the CausalMM tests do not borrow the code they check.

- ``uniform(seed, head, q, k)``: x = (seed * 0x9E3779B1 + head * 0x85EBCA77 + q * 0xC2B2AE3D
  + k * 0x27D4EB2F) mod 2^32, then the lowbias32 integer hash (C. Wellons, "Prospecting for hash functions",
  2018): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16 (mod 2^32); the
  number is (x >> 8 + 1) / 2^24, in (0, 1]. Positions are counted from the row's first non-padding token.
- ``shuffle_order(seed, layer, positions)``: the SHUFFLED permutation of one image span: the span's keys
  sorted by ``uniform(seed, layer, -1, position)``; the j-th key of the span takes the weight of the j-th
  key of that order.
"""

from __future__ import annotations

M32 = (1 << 32) - 1


def uniform(seed: int, head: int, q: int, k: int) -> float:
    x = (seed * 0x9E3779B1 + head * 0x85EBCA77 + q * 0xC2B2AE3D + k * 0x27D4EB2F) & M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return ((x >> 8) + 1) / float(1 << 24)


def shuffle_order(seed: int, layer: int, positions: list[int], pad: int = 0) -> list[int]:
    """``positions`` (key indices of one image span) in their shuffled order; ``pad`` = the row's padding."""
    keys = {p: uniform(seed, layer, -1, p - pad) for p in positions}
    assert len(set(keys.values())) == len(keys), "a tie in the draws: the order would be ambiguous"
    return sorted(positions, key=keys.__getitem__)
