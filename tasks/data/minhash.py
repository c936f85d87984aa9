"""MinHash signatures for near-duplicate detection, compatible with datasketch.

Tokens are words for space-separated scripts and single characters for scripts written without spaces
(Chinese, Japanese, Korean, Thai), so one shingle size works for both.

Speed (1M documents in well under a minute of signature time on 2 cores) comes from four choices:
- Batches of texts are worked on by several threads at once (`in_threads`): the work is polars and numpy, which
  release the GIL, so every core takes part (polars runs one string column on one core).
- Tokenising runs in polars (Rust regex) for every text made only of characters on which polars and
  Python's `re` provably agree (checked once per process, character by character); other texts take the Python path.
- The shingle hash is composed from per-token xxh64 hashes (see `hash64`), so only the distinct tokens are hashed
  in Python and every shingle hash is a few vectorised multiply-adds. It is still a plain function of the shingle's
  bytes, so datasketch's own `MinHash(hashfunc=hash64)` is the reference and the signatures are bit-identical.
- The 128 affine permutations run permutation by permutation over a flat, cache-sized array of shingle hashes
  with `np.minimum.reduceat` per document (10x faster than a (shingles, perms) matrix reduced along axis 0).
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import polars as pl
import xxhash
from datasketch import LeanMinHash, MinHash

from tasks.core.warehouse import usable_cores

# One token per CJK / kana / hangul / Thai character; otherwise runs of word characters.
_TOKEN = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u0e00-\u0e7f]|[^\W_]+",
    re.UNICODE,
)
TOKEN_PATTERN = _TOKEN.pattern
_MASK64 = (1 << 64) - 1
_DOCS_PER_BATCH = 50_000  # bounds the polars token lists held at once
_SHINGLES_PER_BLOCK = 1 << 16  # one block of uint64 shingle hashes stays in L2 across the permutation loop
# Batches worked on at once, each on a thread: a batch's token lists and hashes (~0.3 GB for 50k Alpaca-sized texts)
# exist once per thread, hence the cap.
BATCH_THREADS = min(4, usable_cores())
T = TypeVar("T")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def shingles(text: str, ngram: int) -> list[bytes]:
    toks = tokenize(text)
    if len(toks) <= ngram:
        return [" ".join(toks).encode()] if toks else []
    return [" ".join(toks[i : i + ngram]).encode() for i in range(len(toks) - ngram + 1)]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.cache
def _position_weight(k: int) -> int:
    return _splitmix64(2 * k) | 1  # odd, so each position's term is a bijection of the token hash


@functools.cache
def _length_tag(n: int) -> int:
    return _splitmix64(2 * n + 1)


def hash64(data: bytes) -> int:
    """The 64-bit shingle hash, usable as datasketch's `hashfunc`.

    For a shingle of space-joined tokens t_0 .. t_{n-1}: (tag_n + sum_k w_k * xxh64(t_k)) mod 2^64, with fixed odd
    per-position weights w_k. It is as collision-free as xxh64 for our use (an order-sensitive combination of
    independent 64-bit hashes; datasketch's affine64 scheme mixes it with the MurmurHash3 finalizer anyway) and lets
    `signatures` hash each distinct token once instead of every shingle.
    """
    parts = data.split(b" ")
    acc = _length_tag(len(parts))
    for k, part in enumerate(parts):
        acc += _position_weight(k) * xxhash.xxh64_intdigest(part)
    return acc & _MASK64


def datasketch_minhash(text: str, num_perm: int, seed: int, ngram: int) -> MinHash:
    """Reference implementation: datasketch's own MinHash over the same shingles and hash."""
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=hash64, scheme="affine64")
    m.update_batch(shingles(text, ngram))
    return m


# --- batch signatures -----------------------------------------------------------------------------------------


@functools.cache
def _polars_unsafe_pattern() -> str:
    """A regex class matching every character on which polars' tokenising could differ from `tokenize`.

    Checked here, once per process, against the installed Python and polars (their Unicode tables differ: combining
    marks, superscript digits, newer code points). Lowercasing must map the character to one character, identically,
    and that character must tokenise identically; Greek capital sigma is excluded because its lowercase depends on
    context. Only the BMP and the emoji planes are checked; anything else goes the Python way.
    """
    candidates = [*range(0xD800), *range(0xE000, 0x10000), *range(0x1F000, 0x20000)]
    chars = [chr(c) for c in candidates]
    py_lower = [ch.lower() for ch in chars]
    pl_lower = pl.Series(chars, dtype=pl.String).str.to_lowercase()
    pl_tokens = pl_lower.str.extract_all(_TOKEN.pattern).to_list()
    safe = [
        c
        for c, low, pl_low, pl_tok in zip(candidates, py_lower, pl_lower.to_list(), pl_tokens)
        if len(low) == 1 and low == pl_low and _TOKEN.findall(low) == pl_tok and c != 0x3A3
    ]
    ranges, start, prev = [], safe[0], safe[0]
    for c in safe[1:]:
        if c != prev + 1:
            ranges.append((start, prev))
            start = c
        prev = c
    ranges.append((start, prev))
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[^{body}]"


@functools.cache
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine64").permutations
    return a.astype(np.uint64), b.astype(np.uint64)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, which datasketch's affine64 scheme applies to every input hash."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def low_bits(sigs: np.ndarray, bits: int = 8) -> np.ndarray:
    """b-bit MinHash: `bits` bits of each signature value after MurmurHash3's finalizer, as uint8.

    The affine64 values are a * h + b mod 2^64, whose low bits depend only on the low bits of h: cut off directly,
    two texts of one shingle each whose shingle hashes share their low 8 bits would agree on every value. Mixed
    first, two different minima agree by chance only (2^-bits), independently across permutations."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return (_fmix64(sigs.astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.uint8)


def _hash_tokens(tokens: list[str] | pl.Series, cache: dict[str, int] | None = None) -> np.ndarray:
    if isinstance(tokens, pl.Series):  # hash each distinct token once, then gather
        vocab = tokens.unique()
        codes = tokens.cast(pl.Enum(vocab)).to_physical().to_numpy()
        vocab_hash = np.fromiter(
            (xxhash.xxh64_intdigest(t.encode()) for t in vocab.to_list()), dtype=np.uint64, count=len(vocab)
        )
        return vocab_hash[codes]
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, t in enumerate(tokens):
        h = cache.get(t)
        if h is None:
            h = cache[t] = xxhash.xxh64_intdigest(t.encode())
        out[i] = h
    return out


def _shingle_hashes(token_hash: np.ndarray, n_tokens: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `hash64` of every shingle: flat shingle hashes in document order, and shingles per document."""
    starts = np.zeros(len(n_tokens), dtype=np.int64)
    np.cumsum(n_tokens[:-1], out=starts[1:])
    n_shingles = np.where(n_tokens > ngram, n_tokens - ngram + 1, np.minimum(n_tokens, 1))
    weights = [np.uint64(_position_weight(k)) for k in range(ngram)]

    # Full n-grams: one shingle starting at every token that has ngram - 1 tokens after it in its document.
    long_doc = n_tokens >= ngram
    padded = np.concatenate([token_hash, np.zeros(ngram, dtype=np.uint64)])
    pos_in_doc = np.arange(len(token_hash), dtype=np.int64) - np.repeat(starts, n_tokens)
    first = np.flatnonzero(pos_in_doc <= np.repeat(n_tokens - ngram, n_tokens))
    full = np.full(len(first), _length_tag(ngram), dtype=np.uint64)
    for k in range(ngram):
        full += padded[first + k] * weights[k]

    # Documents with fewer than ngram tokens are one shingle of all their tokens.
    short = np.flatnonzero((n_tokens > 0) & ~long_doc)
    short_len = n_tokens[short]
    partial = np.array([_length_tag(int(n)) for n in range(ngram + 1)], dtype=np.uint64)[short_len]
    for k in range(ngram - 1):
        has_k = short_len > k
        partial[has_k] += padded[starts[short[has_k]] + k] * weights[k]

    # Interleave back into document order: each document's shingles come from exactly one of the two groups.
    hashes = np.empty(int(n_shingles.sum()), dtype=np.uint64)
    offsets = np.zeros(len(n_tokens), dtype=np.int64)
    np.cumsum(n_shingles[:-1], out=offsets[1:])
    long_mask = np.repeat(long_doc, n_shingles)
    hashes[long_mask] = full
    hashes[offsets[short]] = partial
    return hashes, n_shingles


def _permute_min(hashes: np.ndarray, n_shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per document and permutation k: min over its shingles of a_k * fmix64(h) + b_k (mod 2^64)."""
    n_docs, num_perm = len(n_shingles), len(a)
    out = np.full((num_perm, n_docs), np.iinfo(np.uint64).max, dtype=np.uint64)  # empty docs keep datasketch's max
    hashes = _fmix64(hashes)
    nonempty = np.flatnonzero(n_shingles)
    ends = np.cumsum(n_shingles[nonempty])
    begins = ends - n_shingles[nonempty]
    buf = np.empty(0, dtype=np.uint64)
    d0 = 0
    while d0 < len(nonempty):
        # A block of whole documents of about _SHINGLES_PER_BLOCK shingles (at least one document).
        d1 = max(d0 + 1, int(np.searchsorted(ends, begins[d0] + _SHINGLES_PER_BLOCK, side="right")))
        s0, s1 = int(begins[d0]), int(ends[d1 - 1])
        block, seg = hashes[s0:s1], begins[d0:d1] - s0
        if len(buf) < len(block):
            buf = np.empty(len(block), dtype=np.uint64)
        tmp = buf[: len(block)]
        cols = nonempty[d0:d1]
        for k in range(num_perm):
            np.multiply(block, a[k], out=tmp)
            tmp += b[k]
            out[k, cols] = np.minimum.reduceat(tmp, seg)
        d0 = d1
    return out.T


def _token_hash_batches(texts: list[str] | pl.Series):
    """Yield (row indices, flat token hashes, tokens per row) covering every text of `texts` (a polars Series is
    read as it is: its strings never become Python objects, except those tokenised the Python way)."""
    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.String)
    unsafe = series.str.contains(_polars_unsafe_pattern()).to_numpy()
    safe_rows = np.flatnonzero(~unsafe)
    if len(safe_rows):
        safe = series if len(safe_rows) == len(series) else series.gather(safe_rows)
        tokens = safe.str.to_lowercase().str.extract_all(_TOKEN.pattern)
        yield safe_rows, _hash_tokens(tokens.explode().drop_nulls()), tokens.list.len().to_numpy()
    unsafe_rows = np.flatnonzero(unsafe)
    if len(unsafe_rows):
        per_row = [tokenize(t) for t in series.gather(unsafe_rows).to_list()]
        flat = [t for row in per_row for t in row]
        yield unsafe_rows, _hash_tokens(flat, {}), np.array([len(r) for r in per_row], dtype=np.int64)


def in_threads(work: Callable[[int], T], starts: range) -> Iterator[T]:
    """work(start) for each start, in order, BATCH_THREADS at a time: polars and numpy release the GIL while they
    run, so one process tokenises, hashes and permutes on every core (measured CPU = wall time with one thread)."""
    if len(starts) <= 1 or BATCH_THREADS == 1:
        yield from map(work, starts)
        return
    with ThreadPoolExecutor(BATCH_THREADS) as pool:
        running: deque[Future] = deque()
        for start in starts:
            running.append(pool.submit(work, start))
            if len(running) >= BATCH_THREADS:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def signatures(texts: list[str], num_perm: int, seed: int, ngram: int) -> np.ndarray:
    """(len(texts), num_perm) uint64 signatures, identical to `datasketch_minhash(...).hashvalues` per text."""
    a, b = _permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)

    def sign(lo: int) -> None:
        for rows, token_hash, n_tokens in _token_hash_batches(texts[lo : lo + _DOCS_PER_BATCH]):
            hashes, n_shingles = _shingle_hashes(token_hash, n_tokens.astype(np.int64), ngram)
            out[lo + rows] = _permute_min(hashes, n_shingles, a, b)  # batches write disjoint rows

    for _ in in_threads(sign, range(0, len(texts), _DOCS_PER_BATCH)):
        pass
    return out


def shingle_hash_batches(texts: list[str], ngram: int):
    """Yield (row indices, flat shingle hashes of those rows in order, shingles per row) covering every text, in
    batches of bounded size: the bulk form of `shingle_sets` (hashes as `hash64` gives them, repeats kept)."""
    def batch(lo: int) -> list:
        return [(lo + rows, *_shingle_hashes(token_hash, n_tokens.astype(np.int64), ngram))
                for rows, token_hash, n_tokens in _token_hash_batches(texts[lo : lo + _DOCS_PER_BATCH])]

    for parts in in_threads(batch, range(0, len(texts), _DOCS_PER_BATCH)):
        yield from parts


def ngram_hash_batches(texts: list[str], ngram: int, only: HashSet | None = None):
    """Like `shingle_hash_batches`, but only whole n-grams: a text of fewer than `ngram` tokens has none (instead of
    one shingle of all its tokens). With `only`, just the n-grams in that set (and per row how many of them), tested
    on the batch's own thread, so the lookups run on every core too."""
    def batch(lo: int) -> list:
        parts = []
        for rows, token_hash, n_tokens in _token_hash_batches(texts[lo : lo + _DOCS_PER_BATCH]):
            n_tokens = n_tokens.astype(np.int64)
            hashes, n_shingles = _shingle_hashes(token_hash, n_tokens, ngram)
            keep = np.repeat(n_tokens >= ngram, n_shingles)
            if only is not None:
                keep &= only.contains(hashes)
            if not keep.all():
                row_of = np.repeat(np.arange(len(rows)), n_shingles)[keep]
                hashes, n_shingles = hashes[keep], np.bincount(row_of, minlength=len(rows)).astype(np.int64)
            parts.append((lo + rows, hashes, n_shingles))
        return parts

    for parts in in_threads(batch, range(0, len(texts), _DOCS_PER_BATCH)):
        yield from parts


class HashSet:
    """Membership of 64-bit hashes in a fixed set: a bitmap over the top `prefix_bits` bits first, then the sorted
    array for what passes it, looked up in ascending order so the binary searches stay in cache.

    The bitmap has about 32 bits a member (2^20 to 2^30 bits: 128 KiB to 128 MiB), so about 3 % of the hashes that
    are not members pass it: the sort and search after it, not the bitmap, are the cost of a lookup."""

    def __init__(self, hashes: np.ndarray, prefix_bits: int | None = None):
        self.hashes = np.unique(hashes)
        if prefix_bits is None:
            prefix_bits = int(np.clip(np.ceil(np.log2(max(len(self.hashes), 1) * 32)), 20, 30))
        self.shift = np.uint64(64 - prefix_bits)
        self.bitmap = np.zeros(1 << (prefix_bits - 3), dtype=np.uint8)
        prefix = self.hashes >> self.shift
        np.bitwise_or.at(self.bitmap, prefix >> np.uint64(3), (1 << (prefix & np.uint64(7))).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        prefix = hashes >> self.shift
        maybe = np.flatnonzero((self.bitmap[prefix >> np.uint64(3)] >> (prefix & np.uint64(7)).astype(np.uint8)) & 1)
        out = np.zeros(len(hashes), dtype=bool)
        if len(maybe) and len(self.hashes):
            order = maybe[np.argsort(hashes[maybe])]
            pos = np.minimum(np.searchsorted(self.hashes, hashes[order]), len(self.hashes) - 1)
            out[order] = self.hashes[pos] == hashes[order]
        return out


def shingle_sets(texts: list[str], ngram: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted: the sets whose Jaccard its signature estimates."""
    out: list[np.ndarray] = [np.empty(0, dtype=np.uint64)] * len(texts)
    for rows, hashes, n_shingles in shingle_hash_batches(texts, ngram):
        for row, part in zip(rows, np.split(hashes, np.cumsum(n_shingles)[:-1])):
            out[row] = np.unique(part)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two shingle sets from `shingle_sets` (two empty texts are identical, as their signatures are)."""
    if not len(a) and not len(b):
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def exact_similarity(texts_of: Callable[[np.ndarray], list[str]], ngram: int):
    """A `near_duplicate_clusters(exact=...)` check: the exact Jaccard of row pairs. `texts_of(rows)` gives the texts
    of row indices; it is asked only for rows in some candidate pair."""
    def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        rows = np.unique(np.concatenate([left, right]))
        sets = dict(zip(rows.tolist(), shingle_sets(texts_of(rows), ngram)))
        return np.fromiter((jaccard(sets[i], sets[j]) for i, j in zip(left.tolist(), right.tolist())),
                           dtype=np.float64, count=len(left))

    return similarity


def to_lean(signature: np.ndarray, seed: int) -> LeanMinHash:
    """Wrap a signature row for datasketch's MinHashLSH (any storage backend)."""
    return LeanMinHash(seed=seed, hashvalues=signature, scheme="affine64")


# --- LSH banding and clustering -------------------------------------------------------------------------------


# Every candidate pair is verified against the threshold afterwards, so a false positive costs one comparison and a
# false negative loses a duplicate: weight misses 9:1. At 128 permutations and 0.8 this gives 14 bands of 9 rows,
# which finds a pair at Jaccard 0.85 with probability 0.975 (datasketch's even 0.5/0.5 weights: 0.69).
FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT = 0.1, 0.9


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): datasketch's optimum for this threshold with misses weighted 9:1."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT)


def _row_keys(block: np.ndarray) -> np.ndarray:
    """A 64-bit key per row of a uint64 block (equal rows, equal keys; collisions are checked by callers)."""
    key = np.zeros(len(block), dtype=np.uint64)
    for j in range(block.shape[1]):
        key += _fmix64(block[:, j] + np.uint64(_splitmix64(j)))
    return key


def _pairs_within_groups(members: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """All (i, j) pairs of members inside each consecutive group; members sorted ascending within groups."""
    pos_in_group = np.arange(len(members)) - np.repeat(np.cumsum(group_sizes) - group_sizes, group_sizes)
    rest = np.repeat(group_sizes, group_sizes) - pos_in_group - 1  # members after this one in its group
    out = []
    idx = np.flatnonzero(rest > 0)
    d = 1
    while len(idx):
        out.append(np.stack([members[idx], members[idx + d]], axis=1))
        idx = idx[rest[idx] > d]
        d += 1
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def candidate_pairs(sigs: np.ndarray, threshold: float, seed: int) -> np.ndarray:
    """(m, 2) int64 index pairs i < j that share at least one LSH band (datasketch MinHashLSH banding).

    Banding is a group-by on a 64-bit key of each band; pairs are then checked for equal band values, so a key
    collision cannot add a pair. Sorted like the pairs datasketch's index would give.
    """
    n = len(sigs)
    bands, rows = lsh_params(threshold, sigs.shape[1])
    found = []
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows]
        keys = _row_keys(cols)
        order = np.argsort(keys, kind="stable")  # stable: members ascending within a key
        sorted_keys = keys[order]
        boundary = np.flatnonzero(np.diff(sorted_keys)) + 1
        starts = np.concatenate([[0], boundary])
        sizes = np.diff(np.concatenate([starts, [n]]))
        in_group = np.repeat(sizes > 1, sizes)
        pairs = _pairs_within_groups(order[in_group], sizes[sizes > 1])
        if len(pairs):
            same = np.ones(len(pairs), dtype=bool)
            for c in range(rows):
                same &= cols[pairs[:, 0], c] == cols[pairs[:, 1], c]
            found.append(pairs[same][:, 0].astype(np.int64) * n + pairs[same][:, 1])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1).astype(np.int64)


def _similarity(sigs: np.ndarray, left: np.ndarray, right: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Estimated Jaccard of row pairs (the fraction of equal signature values), in chunks to bound memory.

    Signatures narrower than 64 bits a value (uint8: b-bit MinHash) agree by chance with probability c = 2^-bits
    where the minima differ, so the fraction is J + (1 - J) c and the estimate is (fraction - c) / (1 - c)."""
    out = np.empty(len(left), dtype=np.float64)
    for lo in range(0, len(left), chunk):
        out[lo : lo + chunk] = (sigs[left[lo : lo + chunk]] == sigs[right[lo : lo + chunk]]).mean(axis=1)
    if sigs.dtype.itemsize < 8:
        chance = 2.0 ** (-8 * sigs.dtype.itemsize)
        out = np.clip((out - chance) / (1 - chance), 0.0, 1.0)
    return out


def near_duplicate_clusters(sigs: np.ndarray, threshold: float, seed: int,
                            exact: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows whose Jaccard >= threshold, transitively.

    LSH candidates are confirmed by `exact(left, right)` (see `exact_similarity`) when given, else by the
    signatures' estimate. With 128 permutations the estimate's standard error near 0.8 is about 0.035, so it turns
    away a large share of true pairs just above the threshold (and admits some just below); the exact check does not.
    Rows are assumed ordered by priority (earlier = kept). Returns (rep, sim): rep[i] is the index of row i's
    cluster representative (the cluster's first row), sim[i] the estimated Jaccard of row i to it.
    Identical signatures are collapsed first (they are always one cluster), so exact copies cost no pairs.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sigs)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    _, first, inverse = np.unique(_row_keys(sigs), return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if not all((sigs[lo : lo + 65536] == sigs[first[inverse[lo : lo + 65536]]]).all() for lo in range(0, n, 65536)):
        first, inverse = np.arange(n), np.arange(n)  # a key collision: fall back to every row on its own
    pairs = candidate_pairs(sigs[first], threshold, seed)
    left, right = first[pairs[:, 0]], first[pairs[:, 1]]
    keep = (exact(left, right) if exact else _similarity(sigs, left, right)) >= threshold
    src = np.concatenate([left[keep], np.arange(n)])
    dst = np.concatenate([right[keep], first[inverse]])
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    lowest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(lowest, labels, np.arange(n))
    rep = lowest[labels]
    return rep, _similarity(sigs, np.arange(n), rep)
