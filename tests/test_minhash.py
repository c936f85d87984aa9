"""MinHash core: batch signatures are datasketch's own, clustering matches datasketch's MinHashLSH."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHashLSH

from tasks.data import minhash

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NUM_PERM, SEED, NGRAM, THRESHOLD = 128, 1, 5, 0.8


def _alpaca_texts(name: str) -> list[str]:
    rows = json.loads((SHARED / name).read_text())
    return [" ".join([r["instruction"], r.get("input", ""), r["output"]]) for r in rows]


@pytest.fixture(scope="module")
def real_texts() -> list[str]:
    en = _alpaca_texts("instruct_alpaca_en/alpaca_en_demo.json")
    zh = _alpaca_texts("instruct_alpaca_zh/alpaca_zh_demo.json")
    return en[:300] + zh[:300]


EDGE_TEXTS = [
    "",
    "   ...  ",
    "word",
    "two words",
    "exactly five tokens right here",
    "中",
    "中文短",
    "mixed中文abc 字 and 日本語のテキスト 한국어 텍스트",
    "ภาษาไทยก็มี and Thai",
    "ΣΟΦΟΣ Σίσυφος naïve café x² ½ İstanbul e\u0301 under_score",  # characters polars and Python tokenise differently
    "emoji 😀 between 🎉 words",
]


def _reference(texts, num_perm=NUM_PERM, seed=SEED, ngram=NGRAM) -> np.ndarray:
    return np.array([minhash.datasketch_minhash(t, num_perm, seed, ngram).hashvalues for t in texts], dtype=np.uint64)


def test_tokenize_and_shingles():
    assert minhash.tokenize("Hello, World! 中文") == ["hello", "world", "中", "文"]
    assert minhash.shingles("", 5) == []
    assert minhash.shingles("a b c", 5) == [b"a b c"]
    assert minhash.shingles("a b c d", 2) == [b"a b", b"b c", b"c d"]


def test_hash64_is_order_sensitive_and_64_bit():
    values = {minhash.hash64(s) for s in [b"a b c", b"c b a", b"a b", b"a b c d", b"ab c"]}
    assert len(values) == 5
    assert all(0 <= v < 2**64 for v in values)


def test_signatures_bit_identical_to_datasketch_on_real_english_and_chinese(real_texts):
    texts = real_texts + EDGE_TEXTS
    sigs = minhash.signatures(texts, NUM_PERM, SEED, NGRAM)
    assert sigs.dtype == np.uint64 and sigs.shape == (len(texts), NUM_PERM)
    np.testing.assert_array_equal(sigs, _reference(texts))
    # Empty texts keep datasketch's "empty" value; a text and its copy agree; different texts differ.
    assert (sigs[len(real_texts)] == np.iinfo(np.uint64).max).all()
    assert (sigs[0] != sigs[1]).any()


@pytest.mark.parametrize("num_perm,seed,ngram", [(64, 7, 1), (32, 3, 3), (16, 0, 13)])
def test_signatures_other_settings(real_texts, num_perm, seed, ngram):
    texts = real_texts[::25] + EDGE_TEXTS
    np.testing.assert_array_equal(
        minhash.signatures(texts, num_perm, seed, ngram), _reference(texts, num_perm, seed, ngram)
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_small_batches_on_threads_give_datasketch_signatures_and_ngrams_in_order(real_texts, monkeypatch, threads):
    """Batches of 7 texts on 1 or 3 threads: every batch's signatures land on its own rows, and the n-gram batches
    come back in text order, as one batch of everything gives them."""
    texts = real_texts[:60] + EDGE_TEXTS
    whole = list(minhash.ngram_hash_batches(texts, 3))
    monkeypatch.setattr(minhash, "_DOCS_PER_BATCH", 7)
    monkeypatch.setattr(minhash, "BATCH_THREADS", threads)
    np.testing.assert_array_equal(minhash.signatures(texts, 32, SEED, NGRAM), _reference(texts, 32))
    batched = list(minhash.ngram_hash_batches(texts, 3))
    assert len(batched) > len(texts) // 7  # one or two per batch (polars and Python tokenised texts)
    rows = np.concatenate([r for r, _, _ in batched])
    assert sorted(rows.tolist()) == list(range(len(texts)))
    assert [r.min() for r, _, _ in batched] == sorted(r.min() for r, _, _ in batched)  # batches in order
    per_row = lambda parts: {int(r): h[o : o + n].tolist() for rows, h, ns in parts  # noqa: E731
                             for r, o, n in zip(rows, np.cumsum(ns) - ns, ns)}
    assert per_row(batched) == per_row(whole)


def test_ngrams_kept_only_in_a_set_are_the_whole_ngrams_filtered_row_by_row(real_texts):
    """`only` keeps each row's n-grams that are in the set, in order, with per-row counts of what is left."""
    texts = real_texts[:40] + EDGE_TEXTS
    whole = list(minhash.ngram_hash_batches(texts, 3))
    every = np.concatenate([h for _, h, _ in whole])
    chosen = minhash.HashSet(every[::3])
    assert 0 < len(chosen) < len(np.unique(every))
    per_row = lambda parts: {int(r): h[o : o + n].tolist() for rows, h, ns in parts  # noqa: E731
                             for r, o, n in zip(rows, np.cumsum(ns) - ns, ns)}
    members = set(chosen.hashes.tolist())
    expected = {r: [g for g in grams if g in members] for r, grams in per_row(whole).items()}
    assert per_row(minhash.ngram_hash_batches(texts, 3, only=chosen)) == expected
    assert any(expected.values()) and not all(len(v) == len(per_row(whole)[r]) for r, v in expected.items())


def test_hash_set_finds_exactly_its_members_at_any_bitmap_size():
    rng = np.random.default_rng(0)
    members, others = rng.integers(0, 2**63, 5000, dtype=np.uint64), rng.integers(0, 2**63, 5000, dtype=np.uint64)
    probe = np.concatenate([others, members])
    for bits in (None, 8, 20):
        found = minhash.HashSet(members, bits).contains(probe)
        np.testing.assert_array_equal(found, np.isin(probe, members))


def test_signatures_of_no_texts():
    assert minhash.signatures([], NUM_PERM, SEED, NGRAM).shape == (0, NUM_PERM)


def test_to_lean_works_in_datasketch_lsh(real_texts):
    sigs = minhash.signatures(real_texts[:50], NUM_PERM, SEED, NGRAM)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, row in enumerate(sigs):
        lsh.insert(f"doc{i}", minhash.to_lean(row, SEED))
    query = minhash.datasketch_minhash(real_texts[17], NUM_PERM, SEED, NGRAM)  # built by datasketch itself
    assert "doc17" in lsh.query(query)


def _naive_clusters(sigs, threshold, seed):
    """The original implementation: datasketch MinHashLSH queries + union-find, one row at a time."""
    lsh = MinHashLSH(threshold=threshold, num_perm=sigs.shape[1],
                     weights=(minhash.FALSE_POSITIVE_WEIGHT, minhash.FALSE_NEGATIVE_WEIGHT))
    parent = list(range(len(sigs)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    pairs = []
    for i, row in enumerate(sigs):
        lean = minhash.to_lean(row, seed)
        pairs += [(j, i) for j in lsh.query(lean)]
        lsh.insert(i, lean, check_duplication=False)
    for i, j in pairs:
        if np.mean(sigs[i] == sigs[j]) >= threshold:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)
    rep = np.array([find(i) for i in range(len(sigs))])
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2), rep


@pytest.fixture(scope="module")
def corpus_with_duplicates(real_texts):
    """Real rows plus exact copies, light edits (Jaccard well above 0.8), edits near the threshold (where the
    banding decides) and heavy edits (well below)."""
    rng = random.Random(0)
    texts = list(real_texts[:300])
    for _ in range(60):
        texts.append(rng.choice(texts[:300]))
    for _ in range(80):
        words = rng.choice(texts[:300]).split()
        if len(words) > 60:
            words[rng.randrange(len(words))] = "edited"
            texts.append(" ".join(words))
    for _ in range(80):
        words = rng.choice(texts[:300]).split()
        for _ in range(max(1, len(words) // 30)):
            words[rng.randrange(len(words))] = "near"
        texts.append(" ".join(words))
    for _ in range(40):
        words = rng.choice(texts[:300]).split()
        for _ in range(len(words) // 3):
            words[rng.randrange(len(words))] = "x"
        texts.append(" ".join(words))
    texts += ["", ""]
    rng.shuffle(texts)
    return texts


def test_candidate_pairs_and_clusters_match_datasketch_lsh(corpus_with_duplicates):
    sigs = minhash.signatures(corpus_with_duplicates, NUM_PERM, SEED, NGRAM)
    want_pairs, want_rep = _naive_clusters(sigs, THRESHOLD, SEED)
    np.testing.assert_array_equal(minhash.candidate_pairs(sigs, THRESHOLD, SEED), want_pairs)
    rep, sim = minhash.near_duplicate_clusters(sigs, THRESHOLD, SEED)
    np.testing.assert_array_equal(rep, want_rep)
    assert (rep <= np.arange(len(rep))).all()
    np.testing.assert_array_equal(sim, (sigs == sigs[rep]).mean(axis=1))
    dropped = int((rep != np.arange(len(rep))).sum())
    assert dropped >= 60  # at least the exact copies and the empty duplicate
    # Every exact copy joins the cluster of its first occurrence.
    first_seen = {}
    for i, t in enumerate(corpus_with_duplicates):
        if t in first_seen:
            assert rep[i] == rep[first_seen[t]]
        else:
            first_seen[t] = i


def test_eight_bit_signatures_cluster_like_full_ones_with_an_unbiased_estimate(corpus_with_duplicates):
    from tasks.data.dedup import stored_form

    full = minhash.signatures(corpus_with_duplicates, NUM_PERM, SEED, NGRAM)
    narrow = stored_form(full)
    assert narrow.dtype == np.uint8
    exact = minhash.exact_similarity(lambda rows: [corpus_with_duplicates[i] for i in rows], NGRAM)
    rep_full, sim_full = minhash.near_duplicate_clusters(full, THRESHOLD, SEED, exact)
    rep, sim = minhash.near_duplicate_clusters(narrow, THRESHOLD, SEED, exact)
    np.testing.assert_array_equal(rep, rep_full)
    moved = rep != np.arange(len(rep))
    assert moved.sum() >= 60 and np.abs(sim - sim_full)[moved].max() < 0.03
    # Rows with no value in common agree on 1/256 of their 8-bit values by chance; the estimate takes that out.
    left, right = np.arange(len(full) - 1), np.arange(1, len(full))
    unrelated = (full[left] == full[right]).mean(axis=1) == 0
    raw = (narrow[left] == narrow[right]).mean(axis=1)[unrelated]
    assert unrelated.sum() > 300 and abs(raw.mean() - 1 / 256) < 0.001
    assert minhash._similarity(narrow, left, right)[unrelated].mean() < raw.mean() - 0.001


def test_eight_bit_signatures_of_one_shingle_texts_agree_only_by_chance():
    # Each text is one 5-token shingle. Cut straight off a * h + b mod 2^64, two such texts whose shingle hashes
    # share their low 8 bits (1 pair in 256) would agree on all 128 values and be collapsed as identical.
    from tasks.data.dedup import stored_form

    texts = [f"what is {a} plus {b}" for a in range(40) for b in range(40)]
    full = minhash.signatures(texts, NUM_PERM, SEED, NGRAM)
    narrow = stored_form(full)
    rep, _ = minhash.near_duplicate_clusters(narrow, THRESHOLD, SEED)
    assert (rep == np.arange(len(texts))).all()
    assert len(minhash.candidate_pairs(narrow, THRESHOLD, SEED)) == 0
    left, right = np.triu_indices(300, k=1)
    agree = (narrow[left] == narrow[right]).mean(axis=1)
    assert abs(agree.mean() - 1 / 256) < 0.0005 and agree.max() < 0.1


def test_clusters_of_empty_and_single_inputs():
    rep, sim = minhash.near_duplicate_clusters(np.empty((0, NUM_PERM), dtype=np.uint64), THRESHOLD, SEED)
    assert rep.shape == (0,) and sim.shape == (0,)
    one = minhash.signatures(["only one document here"], NUM_PERM, SEED, NGRAM)
    rep, sim = minhash.near_duplicate_clusters(one, THRESHOLD, SEED)
    assert rep.tolist() == [0] and sim.tolist() == [1.0]


def test_exact_jaccard_is_the_jaccard_of_the_shingle_sets(real_texts):
    texts = real_texts[:40] + EDGE_TEXTS
    sets = minhash.shingle_sets(texts, NGRAM)
    for i in range(0, len(texts) - 1):
        a, b = set(minhash.shingles(texts[i], NGRAM)), set(minhash.shingles(texts[i + 1], NGRAM))
        want = len(a & b) / len(a | b) if a | b else 1.0
        assert minhash.jaccard(sets[i], sets[i + 1]) == pytest.approx(want), (texts[i], texts[i + 1])
        assert len(sets[i]) == len(a)


def test_exact_similarity_of_many_pairs_is_their_shingle_sets_jaccard(real_texts):
    # Every pair of a small pool (repeats, empty and one-token texts included): the check gives the Jaccard of Python
    # sets of the shingles, and asks for each row's text once.
    texts = real_texts[:30] + [real_texts[0], real_texts[1] + " and one more clause"] + EDGE_TEXTS + ["", "one"]
    left, right = np.triu_indices(len(texts), k=0)
    asked = []

    def texts_of(rows):
        asked.append(len(rows))
        return [texts[i] for i in rows]

    got = minhash.exact_similarity(texts_of, NGRAM)(left, right)
    sets = [set(minhash.shingles(t, NGRAM)) for t in texts]
    want = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 1.0
            for i, j in zip(left.tolist(), right.tolist())]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert asked == [len(texts)] and (np.array(want) == 1.0).sum() > len(texts) and 0 < np.mean(want) < 0.5


def _edited_pairs(n: int, seed: int = 7):
    """(origin, copy) pairs: 30-60 distinct words with one replaced, so true Jaccard falls on both sides of 0.8."""
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(5000)]
    for _ in range(n):
        words = rng.sample(vocab, rng.randint(30, 60))
        copy = list(words)
        copy[rng.randrange(len(words))] = rng.choice(vocab)
        yield " ".join(words), " ".join(copy)


def test_exact_check_keeps_true_pairs_the_estimate_turns_away():
    """Candidates confirmed on their shingles cluster exactly the pairs at Jaccard >= threshold."""
    kept = {"exact": [], "estimate": []}
    truth = []
    for origin, copy in _edited_pairs(300):
        texts = [origin, copy]
        sigs = minhash.signatures(texts, NUM_PERM, SEED, NGRAM)
        if not len(minhash.candidate_pairs(sigs, THRESHOLD, SEED)):
            continue  # an LSH miss: neither check sees the pair
        sets = minhash.shingle_sets(texts, NGRAM)
        truth.append(minhash.jaccard(*sets) >= THRESHOLD)
        exact = minhash.exact_similarity(lambda rows: [texts[i] for i in rows], NGRAM)
        kept["exact"].append(minhash.near_duplicate_clusters(sigs, THRESHOLD, SEED, exact)[0][1] == 0)
        kept["estimate"].append(minhash.near_duplicate_clusters(sigs, THRESHOLD, SEED)[0][1] == 0)
    truth = np.array(truth)
    assert truth.sum() > 50 and (~truth).sum() > 10  # both sides of the threshold are represented
    assert np.array_equal(np.array(kept["exact"]), truth)
    estimate = np.array(kept["estimate"])
    assert (truth != estimate).sum() >= 10  # the estimate errs both ways this close to the threshold (49 of 234)
