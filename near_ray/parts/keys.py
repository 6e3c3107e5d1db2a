"""Compact keys for the resume ledger: 128-bit hashes of the row identities, kept in sorted numpy runs.

A Python set of ``(domain, uri, image_id, sample)`` tuples costs some 400 bytes an entry; a key here
costs 16 (24 with a value), so one process holds tens of millions. 128 bits make a false "already
done" (a collision) as likely as never: below 10^-20 at 100 million rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

SEP = "\x1f"  # the unit separator: never part of a URI, a domain name or an image id
_MIX_HI, _MIX_LO = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
_EMPTY = np.empty((0, 2), dtype=np.uint64)


def digests(strings: list[str]) -> np.ndarray:
    """(n, 2) uint64: the 128-bit BLAKE2b digest of each string."""
    if not strings:
        return _EMPTY.copy()
    blob = b"".join([hashlib.blake2b(s.encode(), digest_size=16).digest() for s in strings])
    return np.frombuffer(blob, dtype=np.uint64).reshape(-1, 2).copy()


def image_keys(domains: list[str], ids: list[str]) -> np.ndarray:
    """The key of (domain, image_id): identical bytes within a domain."""
    return digests([f"{d}{SEP}{i}" for d, i in zip(domains, ids, strict=True)])


def row_keys(domains: list[str], uris: list[str], ids: list[str]) -> np.ndarray:
    """The key of (domain, uri, image_id): one listed image."""
    return digests([f"{d}{SEP}{u}{SEP}{i}" for d, u, i in zip(domains, uris, ids, strict=True)])


def with_sample(keys: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The keys of (key, sample): sample 0 is the key itself, others an independent-looking shift."""
    s = np.asarray(samples, dtype=np.uint64)
    out = keys.copy()
    out[:, 0] ^= s * _MIX_HI
    out[:, 1] ^= s * _MIX_LO
    return out


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    return (keys[:, 0] % np.uint64(partitions)).astype(np.int64)


def _sorted_unique(hi: np.ndarray, lo: np.ndarray, val: np.ndarray | None) -> tuple:
    order = np.lexsort((lo, hi))  # stable: of equal keys the earlier (older) one comes first and is kept
    hi, lo, val = hi[order], lo[order], None if val is None else val[order]
    del order  # each copy is let go as soon as it is used: a merge peaks near 2.5x its run, not 5x
    first = np.ones(len(hi), dtype=bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    if first.all():
        return hi, lo, val
    return hi[first], lo[first], None if val is None else val[first]


class KeySet:
    """A set of 128-bit keys (optionally a 64-bit value each) that grows without rebuilding: sorted runs
    merged when a newer run grows to half the size of the one before (so O(log n) runs), looked up by
    binary search. Of a key added twice, the first value is kept."""

    def __init__(self, with_values: bool = False) -> None:
        self.with_values = with_values
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def __len__(self) -> int:  # a key added twice counts twice until its runs merge
        return sum(len(hi) for hi, _, _ in self._runs)

    def nbytes(self) -> int:
        return sum(hi.nbytes + lo.nbytes + (0 if v is None else v.nbytes) for hi, lo, v in self._runs)

    def add(self, keys: np.ndarray, values: np.ndarray | None = None) -> None:
        if not len(keys):
            return
        val = np.asarray(values, dtype=np.uint64) if self.with_values else None
        self._runs.append(_sorted_unique(np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1]), val))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            self._merge_last()

    def compact(self) -> None:
        while len(self._runs) > 1:
            self._merge_last()

    def _merge_last(self) -> None:
        older, newer = self._runs.pop(-2), self._runs.pop()
        hi, lo = np.concatenate([older[0], newer[0]]), np.concatenate([older[1], newer[1]])
        val = None if older[2] is None else np.concatenate([older[2], newer[2]])
        del older, newer  # the runs' arrays go before the sort's copies come
        self._runs.append(_sorted_unique(hi, lo, val))

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, value) for each key (value 0 where not found or the set keeps none)."""
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros(len(keys), dtype=np.uint64)
        if not len(keys):
            return found, values
        q_hi, q_lo = keys[:, 0], keys[:, 1]
        for hi, lo, val in self._runs:
            left, right = np.searchsorted(hi, q_hi, "left"), np.searchsorted(hi, q_hi, "right")
            one = np.flatnonzero((right - left == 1) & ~found)
            hit = one[lo[left[one]] == q_lo[one]]
            found[hit] = True
            if val is not None:
                values[hit] = val[left[hit]]
            for q in np.flatnonzero((right - left > 1) & ~found):  # two keys share their first 64 bits: rare
                m = np.flatnonzero(lo[left[q] : right[q]] == q_lo[q])
                if len(m):
                    found[q] = True
                    if val is not None:
                        values[q] = val[left[q] + m[0]]
        return found, values
