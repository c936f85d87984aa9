"""Synthetic dedup corpora built from the real texts in ../shared/data, with every document's true cluster known.

Origins are fresh combinations of real sentences (so two origins almost never overlap), then a share of documents
is derived from a random origin: exact copies, normalised copies (case/spacing/punctuation only), near-duplicates
(word substitutions, insertions, deletions or a moved block at a controlled rate) and hard negatives (half of an
origin's sentences followed by other text: related, but not a duplicate). Each derived document records its exact
word 5-gram Jaccard to its origin, computed with the same tokeniser the MinHash path uses.

    .venv/bin/python -m benchmarks.dedup.corpus --size 10000 --lang en --variant standard
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import polars as pl

from tasks.data.minhash import shingles

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out" / "corpora"
NGRAM = 5

# Share of documents of each kind; the rest are origins.
MIX = {"copy": 0.08, "normalized_copy": 0.04, "near_dup": 0.25, "hard_negative": 0.08}
EDIT_RATES = {"standard": (0.05, 0.15), "light": (0.01, 0.04)}
EDITS = ("substitute", "insert", "delete", "move_block")


def source_texts(lang: str) -> list[str]:
    """Every real English or Chinese text in the shared data (instructions, inputs, answers, chat turns)."""
    def alpaca(name):
        return [v for r in json.loads((SHARED / name).read_text()) for v in (r["instruction"], r["input"], r["output"]) if v]

    if lang == "zh":
        return alpaca("instruct_alpaca_zh/alpaca_zh_demo.json")
    texts = alpaca("instruct_alpaca_en/alpaca_en_demo.json")
    for r in json.loads((SHARED / "chat_messages/kto_en_demo.json").read_text()):
        texts += [m["content"] for m in r["messages"]]
    for r in json.loads((SHARED / "preference_sharegpt/dpo_en_demo.json").read_text()):
        texts += [t["value"] for t in r["conversations"]] + [r["chosen"]["value"], r["rejected"]["value"]]
    return texts


def sentence_pool(texts: list[str], lang: str) -> list[str]:
    """Distinct sentences long enough to carry a few 5-grams of their own."""
    split = re.compile(r"(?<=[。！？；\n])" if lang == "zh" else r"(?<=[.!?])\s+|\n+")
    min_tokens = 8 if lang == "zh" else 6
    seen, pool = set(), []
    for t in texts:
        for s in split.split(t):
            s = s.strip()
            key = s.lower()
            if len(s.split() if lang == "en" else s) >= min_tokens and key not in seen:
                seen.add(key)
                pool.append(s)
    return pool


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _units(text: str, lang: str) -> list[str]:
    return list(text) if lang == "zh" else text.split()


def _join(units: list[str], lang: str) -> str:
    return "".join(units) if lang == "zh" else " ".join(units)


def near_duplicate(text: str, lang: str, rate: float, edit: str, filler: list[str], rng: random.Random) -> str:
    units = _units(text, lang)
    k = max(1, round(rate * len(units)))
    if edit == "substitute":
        for i in rng.sample(range(len(units)), min(k, len(units))):
            units[i] = rng.choice(filler)
    elif edit == "insert":
        for _ in range(k):
            units.insert(rng.randrange(len(units) + 1), rng.choice(filler))
    elif edit == "delete":
        for _ in range(min(k, len(units) - 1)):
            units.pop(rng.randrange(len(units)))
    else:  # move a block of k units elsewhere
        start = rng.randrange(max(1, len(units) - k))
        block, rest = units[start : start + k], units[:start] + units[start + k :]
        at = rng.randrange(len(rest) + 1)
        units = rest[:at] + block + rest[at:]
    return _join(units, lang)


def normalized_copy(text: str, rng: random.Random) -> str:
    """Same tokens, different surface: case, spacing and punctuation, which the tokeniser ignores."""
    t = text.upper() if rng.random() < 0.5 else text.lower()
    return re.sub(r"\s+", "  ", re.sub(r"[,.;:!?，。！？]", " ", t)).strip()


def build(size: int, lang: str, variant: str = "standard", seed: int = 0) -> pl.DataFrame:
    """Columns: doc_id, text, cluster (true cluster = its origin's doc_id), kind, edit, rate, jaccard (to origin)."""
    rng = random.Random(seed)
    pool = sentence_pool(source_texts(lang), lang)
    filler = [u for s in rng.sample(pool, min(len(pool), 2000)) for u in _units(s, lang)]
    counts = {kind: int(share * size) for kind, share in MIX.items()}
    n_origins = size - sum(counts.values())
    joiner = "" if lang == "zh" else " "

    origin_sents = [rng.sample(pool, rng.randint(4, 10)) for _ in range(n_origins)]
    docs = [dict(text=joiner.join(s), origin=i, kind="origin", edit="", rate=0.0) for i, s in enumerate(origin_sents)]
    lo, hi = EDIT_RATES[variant]
    for kind, count in counts.items():
        for _ in range(count):
            o = rng.randrange(n_origins)
            text, edit, rate = docs[o]["text"], "", 0.0
            if kind == "normalized_copy":
                text = normalized_copy(text, rng)
            elif kind == "near_dup":
                edit, rate = rng.choice(EDITS), rng.uniform(lo, hi)
                text = near_duplicate(text, lang, rate, edit, filler, rng)
            elif kind == "hard_negative":
                sents = origin_sents[o]
                text = joiner.join(sents[: len(sents) // 2] + rng.sample(pool, len(sents) - len(sents) // 2))
            docs.append(dict(text=text, origin=o, kind=kind, edit=edit, rate=rate))

    rng.shuffle(docs)
    position = {id(d): i for i, d in enumerate(docs)}
    origin_position = [0] * n_origins
    for i, d in enumerate(docs):
        if d["kind"] == "origin":
            origin_position[d["origin"]] = i
    origin_shingles: dict[int, set] = {}
    rows = []
    for d in docs:
        o = origin_position[d["origin"]]
        sim = 1.0
        if d["kind"] in ("near_dup", "hard_negative"):
            if o not in origin_shingles:
                origin_shingles[o] = set(shingles(docs[o]["text"], NGRAM))
            sim = jaccard(set(shingles(d["text"], NGRAM)), origin_shingles[o])
        cluster = position[id(d)] if d["kind"] in ("origin", "hard_negative") else o
        rows.append((position[id(d)], d["text"], cluster, d["kind"], d["edit"], d["rate"], sim, o))
    return pl.DataFrame(
        rows,
        schema=["doc_id", "text", "cluster", "kind", "edit", "rate", "jaccard", "origin"],
        orient="row",
    )


def corpus_path(size: int, lang: str, variant: str) -> Path:
    return OUT / f"{lang}_{variant}_{size}.parquet"


def load(size: int, lang: str, variant: str = "standard") -> pl.DataFrame:
    """The cached corpus, built on first use."""
    path = corpus_path(size, lang, variant)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build(size, lang, variant).write_parquet(path)
    return pl.read_parquet(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--lang", choices=["en", "zh"], default="en")
    p.add_argument("--variant", choices=list(EDIT_RATES), default="standard")
    a = p.parse_args()
    df = load(a.size, a.lang, a.variant)
    print(corpus_path(a.size, a.lang, a.variant))
    print(df.group_by("kind").agg(pl.len(), pl.col("jaccard").mean().alias("mean_jaccard")).sort("kind"))


if __name__ == "__main__":
    main()
