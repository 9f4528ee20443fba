"""The sampler and its seeded RNG, as documented in runtime/csrc/llamavid.h, written independently in numpy
and plain Python so that seeded sampling gives the same tokens in the reference, in Python and in C.

    logits [V] float32 --repetition penalty (float32)--> l --temperature <= 0--> arg max (lowest id among equals)
      p = exp((l - max l) / T) in float64, Z = sequential sum over ids
      candidates by l descending, lower id first; top_k keeps k (then Z = their sequential sum, in that order)
      top_p keeps candidates while the mass before them < top_p * Z (the first always)
      u = Rng.next_double(); the first kept candidate whose running mass exceeds u * kept mass
    Rng: xoshiro256** seeded with four outputs of splitmix64(seed); a double is (next >> 11) * 2**-53
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1


class Rng:
    """xoshiro256** (Blackman and Vigna), seeded by splitmix64."""

    def __init__(self, seed: int = 0):
        x = seed & _M64
        self.s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & _M64
            z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            self.s.append(z ^ (z >> 31))

    def next_u64(self) -> int:
        s = self.s
        rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & _M64
        result = (rotl((s[1] * 5) & _M64, 7) * 9) & _M64
        t = (s[1] << 17) & _M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def next_double(self) -> float:
        return (self.next_u64() >> 11) * 2.0 ** -53


def sample(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           history=(), rng: Rng | None = None) -> int:
    """logits [V] (any float array; used as float32) -> token id."""
    l = np.array(logits, dtype=np.float32).reshape(-1)
    r = np.float32(repetition_penalty)
    if r != 1:
        ids = np.unique([i for i in history if 0 <= i < len(l)]).astype(np.int64)
        x = l[ids]
        l[ids] = np.where(x > 0, x / r, x * r)
    if not np.float32(temperature) > 0:
        return int(np.argmax(l))
    p = np.exp((l.astype(np.float64) - np.float64(l.max())) / np.float64(np.float32(temperature)))
    order = np.lexsort((np.arange(len(l)), -l))              # logit descending, lower id first
    if 0 < top_k < len(l):
        order = order[:top_k]
        Z = np.cumsum(p[order])[-1]
    else:
        Z = np.cumsum(p)[-1]
    mass = np.cumsum(p[order])                                # running mass in candidate order
    before = np.concatenate([[0.0], mass[:-1]])
    keep = before < np.float64(np.float32(top_p)) * Z
    keep[0] = True
    n = int(np.argmin(keep)) if not keep.all() else len(keep)
    kept, kept_mass = order[:n], mass[:n]
    target = (rng or Rng(0)).next_double() * kept_mass[-1]
    above = np.flatnonzero(kept_mass > target)
    return int(kept[above[0] if len(above) else n - 1])
