"""Clean rules, MinHash dedup (English and Chinese), stable leakage-safe split, quality views."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest
from conftest import SHARED_DATA, query, run_data_plane

from tasks.core.config import load_config
from tasks.data import minhash
from tasks.core.warehouse import compact_messages
from tasks.data.clean import clean_frame
from tasks.data.ingest import MESSAGE_TYPE

ALPACA_EN = SHARED_DATA / "instruct_alpaca_en" / "alpaca_en_demo.json"
ALPACA_ZH = SHARED_DATA / "instruct_alpaca_zh" / "alpaca_zh_demo.json"
SHAREGPT = SHARED_DATA / "chat_sharegpt" / "fastchat_dummy_conversation.json"
DPO = SHARED_DATA / "preference_sharegpt" / "dpo_en_demo.json"


def _frame(rows):
    """Parsed rows as the clean stage reads them: (kind, messages, responses[, tools])."""
    rows = [(r + (None,))[:4] for r in rows]
    return pl.from_arrow(pa.table({
        "row_id": [str(i) for i in range(len(rows))], "kind": [r[0] for r in rows], "source": ["t"] * len(rows),
        "row_seq": pa.array(range(len(rows)), pa.int64()), "messages": pa.array([r[1] for r in rows], MESSAGE_TYPE),
        "responses": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "tools": pa.array([json.dumps(r[3]) if r[3] else None for r in rows], pa.string()),
    }))


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_clean_rules_and_normalisation():
    rows = [
        ("sft", [u("Cafe\u0301 \ufeffplease\r\n"), a("Sure.  \nDone")], None),  # normalised, accepted
        ("sft", [u("hi"), a("   ")], None),
        ("sft", [u("hi"), u("again")], None),
        ("sft", [a("I start"), u("then you")], None),
        ("sft", [u("hi"), a("bad \ufffd byte")], None),
        ("preference", [u("2+2?")], ["4", "4"]),
        ("preference", [u("2+2?"), a("4")], ["4", "5"]),
        ("sft", [u("x" * 50), a("y" * 50)], None),
        ("sft", [{"role": "system", "content": "  "}, u("ok?"), a("ok")], None),  # empty system prompt dropped
    ]
    cfg = load_config(None, ["data.clean.max_chars=80"])
    out = clean_frame(_frame(rows), cfg).sort("row_seq")
    reasons = out["reason"].to_list()
    assert reasons == [None, "empty_turn", "no_assistant_reply", "wrong_role_order", "undecodable_text",
                       "identical_responses", "wrong_role_order", "too_long", None]
    first = compact_messages(out["messages"][0].to_list())
    assert first == [u("Café please"), a("Sure.\nDone")]
    assert compact_messages(out["messages"][8].to_list()) == [u("ok?"), a("ok")]
    assert out["language"][0] == "other" or out["language"][0] == "en"


def test_language_mix_tells_chinese_from_english(make_cfg):
    cfg = make_cfg(f"data.ingest.inputs=[{ALPACA_ZH},{ALPACA_EN}]")
    run_data_plane(cfg)
    mix = {(s, lang): share for s, lang, _, share in query(cfg, "SELECT * FROM language_mix")}
    assert mix[("alpaca_zh_demo", "zh")] > 0.9
    assert mix[("alpaca_en_demo", "en")] > 0.95


def test_exact_duplicates_of_alpaca_en_are_found(make_cfg):
    cfg = make_cfg(f"data.ingest.inputs=[{ALPACA_EN}]")
    run_data_plane(cfg)
    original = json.loads(ALPACA_EN.read_text())
    expected = len(original) - len({json.dumps(r, sort_keys=True) for r in original})
    assert expected == 14
    dups = query(cfg, "SELECT row_id, duplicate_of, similarity FROM row_dispositions WHERE status = 'duplicate'")
    assert len(dups) == expected
    assert all(sim == 1.0 for _, _, sim in dups)
    # Each duplicate names a kept row with the same content, ingested earlier.
    for row_id, dup_of, _ in dups:
        a_, b_ = query(cfg, "SELECT raw FROM raw_rows WHERE row_id IN (?, ?) ORDER BY row_seq", [dup_of, row_id])
        assert json.loads(a_[0]) == json.loads(b_[0])
        assert query(cfg, "SELECT status FROM row_dispositions WHERE row_id = ?", [dup_of])[0][0] == "accepted"


def test_sharegpt_near_duplicates_are_clustered(make_cfg):
    cfg = make_cfg(f"data.ingest.inputs=[{SHAREGPT}]")
    run_data_plane(cfg)
    assert query(cfg, "SELECT count(*) FROM cluster_members WHERE method = 'near'")[0][0] > 50
    # Clusters are transitive (a ~ b ~ c): a member may be further than the threshold from the representative, but
    # each near member is within the threshold (exact Jaccard of shingles) of some other member of its cluster.
    rows = query(cfg, "SELECT m.row_id, m.cluster_id, c.dedup_text FROM cluster_members m JOIN clean_rows c "
                      "USING (row_id) WHERE m.method IN ('near', 'representative')")
    sets = minhash.shingle_sets([text for _, _, text in rows], cfg.data.dedup.ngram)
    by_cluster: dict[str, list] = {}
    for (row_id, cluster, _), shingles in zip(rows, sets):
        by_cluster.setdefault(cluster, []).append((row_id, shingles))
    for members in (m for m in by_cluster.values() if len(m) > 1):
        for row_id, shingles in members:
            best = max(minhash.jaccard(shingles, other) for rid, other in members if rid != row_id)
            assert best >= 0.8, (row_id, best)
    clusters = query(cfg, "SELECT members, near_copies FROM duplicate_clusters")
    assert any(near_copies > 0 for _, near_copies in clusters)
    assert query(cfg, "SELECT sum(members) - count(*) FROM duplicate_clusters")[0][0] == \
        query(cfg, "SELECT count(*) FROM row_dispositions WHERE status = 'duplicate'")[0][0]


def test_chinese_near_duplicates_are_found(tmp_path, make_cfg):
    def han_chars(text):
        return sum("\u4e00" <= ch <= "\u9fff" for ch in text)

    rows = [r for r in json.loads(ALPACA_ZH.read_text()) if han_chars(r["output"]) > 300][:40]
    edited = []
    for r in rows[:20]:  # change one character and drop another in a long answer: near, not exact, copies
        out = r["output"]
        edited.append({**r, "output": out[:60] + "很" + out[61:200] + out[201:]})
    f = tmp_path / "zh.json"
    f.write_text(json.dumps(rows + edited, ensure_ascii=False), encoding="utf-8")
    cfg = make_cfg(f"data.ingest.inputs=[{f}]")
    run_data_plane(cfg)
    got = query(cfg, "SELECT d.row_number, r.row_number FROM row_dispositions d JOIN raw_rows r "
                     "ON r.row_id = d.duplicate_of WHERE d.status = 'duplicate' ORDER BY 1")
    assert got == [(41 + i, 1 + i) for i in range(20)]
    assert query(cfg, "SELECT DISTINCT method FROM cluster_members WHERE method <> 'representative'") == [("near",)]


def test_preference_rows_are_deduplicated_on_their_prompt(tmp_path, make_cfg):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "What is the capital of France?", "chosen": "It is Paris.", "rejected": "Nice."},
        {"prompt": "What is the capital of Spain?", "chosen": "Madrid.", "rejected": "Porto."},
    ]), encoding="utf-8")
    cfg = make_cfg(f"data.ingest.inputs=[{f}]")
    run_data_plane(cfg)
    assert query(cfg, "SELECT row_number, status FROM row_dispositions ORDER BY 1") == [
        (1, "accepted"), (2, "duplicate"), (3, "accepted")]


def test_splits_are_by_cluster_and_stable_when_data_arrives(tmp_path, make_cfg):
    cfg = make_cfg(f"data.ingest.inputs=[{SHAREGPT},{ALPACA_EN}]", "data.split.validation=0.2",
                   "data.split.test=0.2")
    run_data_plane(cfg)
    before = dict(query(cfg, "SELECT cluster_id, split FROM split_assignments"))
    assert {"train", "validation", "test"} == set(before.values())
    # Only representatives are trained/evaluated on: no duplicate can sit in another split than its original.
    dup_rows = {r for (r,) in query(cfg, "SELECT row_id FROM row_dispositions WHERE status = 'duplicate'")}
    used = {r for (r,) in query(cfg, "SELECT example_id FROM sft_examples")}
    assert dup_rows and not dup_rows & used

    # New data: exact copies of old rows plus new rows, in a new file.
    old = json.loads(ALPACA_EN.read_text())
    new_rows = old[:30] + [{"instruction": f"New question {i}?", "input": "", "output": f"New answer {i}."}
                           for i in range(30)]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(new_rows), encoding="utf-8")
    cfg2 = make_cfg(f"data.ingest.inputs=[{SHAREGPT},{ALPACA_EN},{extra}]", "data.split.validation=0.2",
                    "data.split.test=0.2")
    run_data_plane(cfg2)
    after = dict(query(cfg2, "SELECT cluster_id, split FROM split_assignments"))
    assert {k: after[k] for k in before} == before
    assert len(after) == len(before) + 30
    statuses = query(cfg2, "SELECT d.status, count(*) FROM row_dispositions d JOIN source_files f USING (file_id) "
                           "WHERE f.path LIKE '%extra.json' GROUP BY ALL ORDER BY 1")
    assert statuses == [("accepted", 30), ("duplicate", 30)]


def test_decontamination_reports_overlap(tmp_path, make_cfg):
    base = "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning"
    rows = [{"instruction": f"Story {i}: {base} {i}", "input": "", "output": f"Tale {i} {base[::-1]}"} for i in range(60)]
    f = tmp_path / "s.json"
    f.write_text(json.dumps(rows), encoding="utf-8")
    cfg = make_cfg(f"data.ingest.inputs=[{f}]", "data.dedup.threshold=0.99", "data.split.validation=0.3",
                   "data.split.test=0.3")
    run_data_plane(cfg)
    held_out = query(cfg, "SELECT count(*) FROM sft_examples WHERE split <> 'train'")[0][0]
    flagged = query(cfg, "SELECT count(*), min(overlap) FROM contamination")[0]
    assert held_out > 0 and flagged[0] == held_out and flagged[1] >= 0.5


def test_quality_views_answer_the_questions(make_cfg):
    cfg = make_cfg()  # the embedded sample data
    run_data_plane(cfg)
    summary = query(cfg, "SELECT source, raw, accepted, rejected, duplicates, pending FROM quality_summary")
    assert len(summary) == 6
    for source, raw, accepted, rejected, dups, pending in summary:
        assert raw == accepted + rejected + dups and pending == 0, source
    assert all(b for (b,) in query(cfg, "SELECT balanced FROM row_conservation"))
    reasons = {r for (r,) in query(cfg, "SELECT DISTINCT reason FROM rejections_by_reason")}
    assert {"malformed_json", "negative_label", "empty_turn", "identical_responses", "wrong_type",
            "no_assistant_reply"} <= reasons
    for view in ("duplicate_clusters", "split_balance", "length_distribution", "length_stats", "language_mix",
                 "preference_pairs", "sft_examples"):
        assert query(cfg, f"SELECT count(*) FROM {view}")[0][0] > 0, view


def test_dedup_shards_run_on_a_dask_cluster(make_cfg):
    from prefect_dask import DaskTaskRunner

    from flows.prepare_data import prepare_data

    cfg = make_cfg(f"data.ingest.inputs=[{SHAREGPT}]", "data.dedup.shards=4")
    flow = prepare_data.with_options(
        task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                                   "dashboard_address": None}))
    state = flow(overrides=[f"storage_root={cfg.storage_root}", f"data.ingest.inputs=[{SHAREGPT}]",
                            "data.dedup.shards=4"], return_state=True)
    assert state.is_completed(), state.message
    assert query(cfg, "SELECT count(*) FROM cluster_members WHERE method = 'near'")[0][0] > 50
    assert query(cfg, "SELECT count(DISTINCT content_hash) FROM minhash_signatures")[0][0] == \
        query(cfg, "SELECT count(DISTINCT content_hash) FROM clean_rows WHERE reason IS NULL")[0][0]


@pytest.mark.parametrize("override, field", [("data.dedup.threshold=1.5", "data.dedup.threshold"),
                                             ("data.split.validation=0.99", "data.split"),
                                             ("data.dedup.num_perm=lots", "data.dedup.num_perm"),
                                             ("data.dedup.typo=1", "data.dedup.typo")])
def test_invalid_config_names_the_field(override, field):
    from tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])
