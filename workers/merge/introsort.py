"""Which entries torch's CPU `argsort(v, descending=True)` puts in its first k, without the sort.

On the CPU torch sorts (value, index) pairs with libstdc++'s `std::sort`, comparing values only, where
a before b  <=>  (isnan(a) and not isnan(b)) or a > b. Among equal values the order is whatever that
introsort leaves, so mergekit's TIES trim (`argsort(|d|, descending=True)[:k]`) keeps tied entries that
no stable rule predicts. The introsort is:

    while last - first > 16:
        if depth == 0: heapsort [first, last)            (depth starts at 2 floor(log2 n))
        depth -= 1
        move the median of v[first+1], v[mid], v[last-1] to first; p = v[first]
        Hoare-partition [first+1, last) around p; cut = where the scans cross
        recurse on [cut, last); last = cut
    stable insertion sort of the whole array

Once a partition is made, which entries end in [0, k) is settled for the side not containing position k,
and the final insertion sort never moves an entry out of its (at most 16-entry) block. Following only
the side that contains k (quickselect on the same pivots and swaps) therefore gives the same first k:
about 2n comparisons instead of n log n. Should the heapsort fallback ever be reached, the real sort
runs instead.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

SMALL = 16  # libstdc++'s _S_threshold: ranges this size are left to the final insertion sort


def settle_first_k(values: np.ndarray, k: int) -> np.ndarray:
    """Reorder the 1-D float32 `values` in place so that values[:k] holds the first k entries of
    `torch.argsort(values, descending=True)` on the CPU (as a set, in no particular order); returns
    their original positions."""
    n = values.size
    if not 0 < k < n:
        return np.arange(max(0, min(k, n)))
    index = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    if _settle(values, index, k):
        return index[:k]
    original = np.empty_like(values)  # the heapsort fallback would be reached: sort for real
    original[index] = values
    first = torch.argsort(torch.from_numpy(original), descending=True)[:k].numpy()
    values[:k] = original[first]
    return first


@njit(inline="always")
def _before(x: float, y: float) -> bool:
    """x sorts before y in torch's descending order (NaN first)."""
    return (x != x and y == y) or x > y


@njit(cache=True, nogil=True)
def _settle(a: np.ndarray, index: np.ndarray, k: int) -> bool:
    """Reorder `a` in place as the introsort does wherever that decides what ends in [0, k), `index`
    following each entry's original position; False (`a` permuted) if the heapsort fallback is reached."""
    n = a.size
    for i in range(n):
        index[i] = i
    first, last, depth = 0, n, 0
    m = n
    while m > 1:  # depth = 2 floor(log2 n)
        m >>= 1
        depth += 2
    while last - first > SMALL:
        if depth == 0:
            return False
        depth -= 1
        p1, p2, p3 = first + 1, first + (last - first) // 2, last - 1
        if _before(a[p1], a[p2]):
            m = p2 if _before(a[p2], a[p3]) else (p3 if _before(a[p1], a[p3]) else p1)
        elif _before(a[p1], a[p3]):
            m = p1
        else:
            m = p3 if _before(a[p2], a[p3]) else p2
        a[first], a[m] = a[m], a[first]
        index[first], index[m] = index[m], index[first]
        pivot, lo, hi = a[first], first + 1, last
        while True:
            while _before(a[lo], pivot):
                lo += 1
            hi -= 1
            while _before(pivot, a[hi]):
                hi -= 1
            if lo >= hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            index[lo], index[hi] = index[hi], index[lo]
            lo += 1
        if lo == k:
            return True
        if lo < k:
            first = lo
        else:
            last = lo
    for i in range(first + 1, last):  # the block holding position k: stable insertion sort
        value, origin, h = a[i], index[i], i
        while h > first and _before(value, a[h - 1]):
            a[h], index[h] = a[h - 1], index[h - 1]
            h -= 1
        a[h], index[h] = value, origin
    return True
