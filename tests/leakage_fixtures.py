"""Multi-turn data in the shapes that leak across a split, built from the shared Alpaca demo sets (English, Chinese).

Like OpenAssistant exports (SFT conversations with history, ranked answers to the same prompts), each
conversation tree around a root question q gives:
  sft  [q, a]                       the question and its answer
  sft  [q, a']                      the same question asked again, another answer
  sft  [q, a] [f, b]                a conversation extending the first one (history + follow-up)
  sft  [q, a'] [f', b'] [g, c]      a longer branch of the same tree
  pref q -> [a, a', a'']            ranked answers to an SFT prompt
  pref [q, a] f -> [b, b'']         ranked answers to a follow-up, with history
plus unrelated single-turn rows. Every text is a real instruction or answer from the shared sets, each used once,
so rows of different trees share no text by construction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = {"en": SHARED_DATA / "instruct_alpaca_en" / "alpaca_en_demo.json",
           "zh": SHARED_DATA / "instruct_alpaca_zh" / "alpaca_zh_demo.json"}


def _pool(lang: str) -> list[tuple[str, str]]:
    """Distinct (question, answer) pairs of one shared set, questions with their input folded in."""
    seen, out = set(), []
    for r in json.loads(SOURCES[lang].read_text(encoding="utf-8")):
        q = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        if q not in seen and r["output"].strip():
            seen.add(q)
            out.append((q, r["output"]))
    return out


def tree_rows(pool: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """One conversation tree from six pool pairs: (sft rows, preference rows) in Alpaca format."""
    (q, a), (_, a2), (f, b), (g, c), (_, a3), (_, b3) = pool
    sft = [{"instruction": q, "input": "", "output": a},
           {"instruction": q, "input": "", "output": a2},
           {"instruction": f, "input": "", "output": b, "history": [[q, a]]},
           {"instruction": g, "input": "", "output": c, "history": [[q, a2], [f, b3]]}]
    pref = [{"instruction": q, "input": "", "output": [a, a2, a3]},
            {"instruction": f, "input": "", "output": [b, b3], "history": [[q, a]]}]
    return sft, pref


def write_leaky_data(out: Path, trees: int = 40, singles: int = 200, seed: int = 0,
                     langs: tuple[str, ...] = ("en", "zh")) -> list[Path]:
    """Per language an SFT file and a ranked-preference file; rows shuffled so trees interleave in ingest order."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for lang in langs:
        pool = _pool(lang)
        rng.shuffle(pool)
        sft, pref = [], []
        for t in range(trees):
            s, p = tree_rows(pool[6 * t:6 * t + 6])
            sft += s
            pref += p
        sft += [{"instruction": q, "input": "", "output": a} for q, a in pool[6 * trees:6 * trees + singles]]
        rng.shuffle(sft)
        rng.shuffle(pref)
        for name, rows in ((f"oasst_{lang}_sft.json", sft), (f"oasst_{lang}_rm.json", pref)):
            (out / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
            paths.append(out / name)
    return paths
