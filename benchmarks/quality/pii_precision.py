"""PII precision and recall on the benchmark corpus (benchmarks/quality/run.py builds it) and the test fixtures.

    .venv/bin/python -m benchmarks.quality.pii_precision --rows 100000

The corpus's planted personal data is known by its snippet (run.PII_SNIPPETS), so a finding is a true positive
when it covers a planted value, and every other finding is listed for reading: the real sentences underneath also
hold personal data of their own (example e-mail addresses in tutorials), which is not an error. The fixtures
(tests/pii_fixtures.py) are fully labelled: English and Chinese personal data and look-alikes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

import polars as pl

from benchmarks.common import ROOT, write_results
from benchmarks.quality.run import CORPUS
from tasks.core.config import PiiConfig
from tasks.data import pii

# Where each planted snippet's value is, by kind.
PLANTED = {
    "email": re.compile(r"(?:anna|li|sam)\.\d+@example\.com"), "phone": re.compile(r"\+44 20 7946 \d{4}|138\d{8}"),
    "credit_card": re.compile(r"4111 1111 1111 1111"), "iban": re.compile(r"DE89 3704 0044 0532 0130 00"),
    "ip_address": re.compile(r"83\.12\.\d+\.\d+"), "secret": re.compile(r"AKIAIOSFODNN7EXAMPLE"),
}


def corpus_scores(rows: int) -> tuple[dict, list[str]]:
    frame = pl.read_parquet(CORPUS / f"rows_{rows}.parquet")
    texts = [m["content"] for ms in frame["messages"].to_list() for m in ms]
    tp, fp, fn, others = Counter(), Counter(), Counter(), []
    regions = PiiConfig().phone_regions
    mask = pii.candidate_mask(pl.Series(texts)).to_list()
    for text, maybe in zip(texts, mask):
        planted = {(k, m.start(), m.end()) for k, rx in PLANTED.items() for m in rx.finditer(text)}
        found = {(f.kind, f.start, f.end) for f in pii.find(text, regions)} if maybe else set()
        for kind, start, end in found:
            if (kind, start, end) in planted:
                tp[kind] += 1
            else:
                fp[kind] += 1
                others.append(f"{kind}: …{text[max(0, start - 30):end + 10]}…".replace("\n", " "))
        for kind, _, _ in planted - found:
            fn[kind] += 1
    return {"tp": tp, "fp": fp, "fn": fn}, others


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from pii_fixtures import LOOK_ALIKES, PII_CASES

    regions = PiiConfig().phone_regions
    ftp, ffp, ffn = Counter(), Counter(), Counter()
    for text, expected in PII_CASES + [(t, []) for t in LOOK_ALIKES]:
        got = {(f.kind, text[f.start:f.end]) for f in pii.find(text, regions)}
        ftp.update(k for k, _ in got & set(expected))
        ffp.update(k for k, _ in got - set(expected))
        ffn.update(k for k, _ in set(expected) - got)
    scores, others = corpus_scores(args.rows)
    lines = [f"# PII precision / recall\n\nFixtures: {len(PII_CASES)} texts with personal data (English and Chinese), "
             f"{len(LOOK_ALIKES)} look-alikes. Corpus: {args.rows:,} rows of real sentences with planted values.\n",
             "| kind | fixtures precision | fixtures recall | corpus planted found | corpus planted missed | "
             "corpus other findings |", "|---|---|---|---|---|---|"]
    for k in pii.KINDS:
        prec = ftp[k] / max(ftp[k] + ffp[k], 1)
        rec = ftp[k] / max(ftp[k] + ffn[k], 1)
        lines.append(f"| {k} | {prec:.3f} ({ftp[k]}/{ftp[k] + ffp[k]}) | {rec:.3f} ({ftp[k]}/{ftp[k] + ffn[k]}) | "
                     f"{scores['tp'][k]} | {scores['fn'][k]} | {scores['fp'][k]} |")
    distinct = Counter(others)
    lines += ["", "Other findings in the corpus (distinct, most frequent first; read them: real data holds real-looking "
              "addresses):", ""] + [f"- {n}× `{t}`" for t, n in distinct.most_common(20)]
    md = "\n".join(lines) + "\n"
    write_results(f"quality_pii_{args.rows}", {"rows": args.rows, "corpus": {k: dict(v) for k, v in scores.items()},
                                               "fixtures": {"tp": ftp, "fp": ffp, "fn": ffn}}, md)
    print(md)


if __name__ == "__main__":
    main()
