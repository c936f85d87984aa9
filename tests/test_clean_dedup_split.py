"""Clean rules, MinHash dedup (English and Chinese), stable leakage-safe split, quality views."""

from __future__ import annotations

import json
import os
from collections import Counter

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import SHARED_DATA, STORIES, query, run_data_plane

from leakage_fixtures import _pool, write_leaky_data

from tasks.core.config import SplitConfig, load_config
from tasks.core.warehouse import compact_messages
from tasks.data import minhash
from tasks.data.clean import clean_frame, with_language
from tasks.data.ingest import MESSAGE_TYPE
from tasks.data.split import assign, contamination, prompt_keys, split_of

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
        "label": pa.array([None] * len(rows), pa.bool_()),
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


def test_token_limit_counts_every_row_with_the_base_tokenizer_in_one_batch():
    from tasks.data.clean import _base_tokenizer, _token_counter

    rows = [("sft", [u("hi"), a("ok")], None), ("sft", [u("tell me a story " * 20), a("once upon a time " * 20)], None)]
    cfg = load_config(None, [f"model.base={STORIES}", "data.clean.max_tokens=40"])
    out = clean_frame(_frame(rows), cfg, _token_counter(cfg)).sort("row_seq")
    tok = _base_tokenizer(cfg)
    counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in out["dedup_text"].to_list()]
    assert counts[0] <= 40 < counts[1]
    assert out["reason"].to_list() == [None, "too_long_tokens"]
    assert out["detail"][1] == f"{counts[1]} tokens"


def test_language_mix_tells_chinese_from_english(make_cfg):
    cfg = make_cfg(f"data.ingest.inputs=[{ALPACA_ZH},{ALPACA_EN}]")
    run_data_plane(cfg)
    mix = {(s, lang): share for s, lang, share in query(cfg, "SELECT source, language, share FROM language_mix")}
    assert mix[("alpaca_zh_demo", "zh")] > 0.9
    assert mix[("alpaca_en_demo", "en")] > 0.95


@pytest.mark.parametrize("text, language", [
    ("日本語のテキストです", "ja"),  # kana wins even beside Han
    ("한국어 텍스트 and the", "ko"),
    ("한 中文", "zh"),  # more Han than Hangul
    ("中文文本 and the", "zh"),  # Han above a quarter of the Latin letters
    ("中文 abcdefghijklmnop the", "en"),  # Han below it
    ("THE Cat", "en"),  # stopwords in any ASCII case
    ("Ünïcödé wörds with", "en"),
    ("éthe thé the_", "other"),  # stopwords only as whole words
    ("iſ", "other"),  # long s is not an s
    ("12345 + 678", "other"),
    ("", "other"),
])
def test_language_guess(text, language):
    out = with_language(pl.DataFrame({"text": [text, "filler of length"]}), pl.col("text"))
    assert out.columns == ["text", "language"] and out["language"][0] == language


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
    # 37 of 500: paraphrased turns of the same few dialogues ("Can you introduce yourself?" / "Please introduce
    # yourself."); compared on their words, not the role labels, which would make 134 (labels are shared shingles).
    assert query(cfg, "SELECT count(*) FROM cluster_members WHERE method = 'near'")[0][0] > 25
    # Clusters are transitive (a ~ b ~ c): a member may be further than the threshold from the representative, but
    # each near member is within the threshold (exact Jaccard of shingles) of some other member of its cluster.
    rows = query(cfg, "SELECT m.row_id, m.cluster_id, minhash_text(c.dedup_text) FROM cluster_members m "
                      "JOIN clean_rows c USING (row_id) WHERE m.method IN ('near', 'representative')")
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


def test_groups_that_would_overlap_training_stay_in_train(tmp_path, make_cfg):
    # Templated rows: their prompts are below the near-duplicate threshold of one another, so each is its own
    # group, but every one shares most of its 8-grams with the others.
    base = "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning"
    rows = [{"instruction": f"Story {i}: {base} {i}", "input": "", "output": f"Tale {i} {base[::-1]}"} for i in range(60)]
    distinct = [{"instruction": q, "input": "", "output": a} for q, a in _pool("en")[:60]]
    f = tmp_path / "s.json"
    f.write_text(json.dumps(rows + distinct), encoding="utf-8")
    cfg = make_cfg(f"data.ingest.inputs=[{f}]", "data.dedup.threshold=0.99", "data.split.validation=0.3",
                   "data.split.test=0.3")
    stats = run_data_plane(cfg)["split"].stats
    assert stats["groups"] == 120 and stats["kept_in_train_by_overlap"] > 0
    story_splits = query(cfg, "SELECT DISTINCT e.split FROM sft_examples e JOIN clean_rows c ON c.row_id = "
                              "e.example_id WHERE c.dedup_text LIKE 'user: Story %'")
    assert story_splits == [("train",)]
    assert query(cfg, "SELECT count(*) FROM contamination")[0][0] == 0
    assert query(cfg, "SELECT count(*) FROM sft_examples WHERE split <> 'train'")[0][0] > 10


def test_each_leakage_shape_shares_a_prompt_group(tmp_path, make_cfg):
    data = tmp_path / "data"
    write_leaky_data(data, trees=12, singles=40)
    cfg = make_cfg(f"data.ingest.inputs=[{data}]", "data.split.validation=0.2", "data.split.test=0.2",
                   "data.split.max_group_share=0.5")  # trees of 6 rows may be held out from ~110 rows
    run_data_plane(cfg)
    group_of = dict(query(cfg, "SELECT cluster_id, group_id FROM split_groups"))
    split_of_row = dict(query(cfg, "SELECT cluster_id, split FROM split_assignments"))
    for lang in ("en", "zh"):
        # Every row of a tree (single, repeat, extension, branch, ranked, ranked with history) has the root
        # question as its first user turn; the unrelated rows each have their own.
        trees: dict[str, list[str]] = {}
        for row_id, raw in query(cfg, "SELECT r.row_id, r.raw FROM raw_rows r JOIN source_files f USING (file_id) "
                                      "WHERE f.path LIKE ?", [f"%oasst_{lang}_%"]):
            rec = json.loads(raw)
            root = rec["history"][0][0] if rec.get("history") else rec["instruction"]
            trees.setdefault(root, []).append(row_id)
        trees = {q: [i for i in ids if i in group_of] for q, ids in trees.items() if len(ids) > 1}
        assert len(trees) == 12 and all(len(ids) >= 4 for ids in trees.values()), lang  # some rows near-duplicates
        assert sum(map(len, trees.values())) >= 12 * 6 - 4
        for ids in trees.values():
            assert len({group_of[i] for i in ids}) == 1 and len({split_of_row[i] for i in ids}) == 1
        assert any(split_of_row[ids[0]] != "train" for ids in trees.values()), lang
    held_out = query(cfg, "SELECT count(*) FROM split_assignments WHERE split <> 'train'")[0][0]
    assert held_out > 40 and query(cfg, "SELECT count(*) FROM contaminated_examples")[0][0] == 0
    assert query(cfg, "SELECT max(rows) FROM prompt_groups")[0][0] == 6

    # The same rows split one by one (as by duplicate cluster alone): the overlap check finds the leaks.
    texts = query(cfg, "SELECT c.row_id, c.dedup_text || chr(10) || coalesce(array_to_string(c.responses, chr(10)), "
                       "'') FROM clean_rows c JOIN split_groups g ON g.cluster_id = c.row_id")
    fractions = {"test": 0.2, "validation": 0.2}
    by_row = [(r, split_of(r, 13, fractions), t) for r, t in texts]
    leaks = contamination([(r, t) for r, sp, t in by_row if sp == "train"],
                          [(r, sp, t) for r, sp, t in by_row if sp != "train"], cfg.data.split)
    assert len(leaks) > 0.25 * sum(sp != "train" for _, sp, _ in by_row)


def test_training_ngrams_merged_a_few_rows_at_a_time_find_what_one_merge_finds(monkeypatch):
    from tasks.data.split import TrainingNgrams

    # Rows built from a small pool of sentences: held-out rows share n-grams with several training rows, so which
    # row is the closest (most shared n-grams, the earliest on a tie) depends on every merge keeping owners right.
    sentences = [f"sentence {i} tells of the {w} river and the hills around it" for i, w in
                 enumerate("red green blue grey black white brown pink".split())]
    text = lambda i: " ".join(sentences[(i * k) % len(sentences)] for k in (1, 3, 5))  # noqa: E731
    train = [(f"t{i}", text(i)) for i in range(30)]
    held_out = [(f"h{i}", "validation", text(i + 100) + " and one new clause") for i in range(12)]
    at_once = contamination(train, held_out, SplitConfig())
    monkeypatch.setattr(TrainingNgrams, "ROWS_PER_MERGE", 7)
    assert contamination(train, held_out, SplitConfig()) == at_once
    # The same by hand, on word 8-grams: each n-gram belongs to the first training row that has it; the closest
    # row is the one that owns most of a held-out row's n-grams (the earliest on a tie).
    grams = lambda t: {tuple(t.split()[k : k + 8]) for k in range(len(t.split()) - 7)}  # noqa: E731
    owner: dict[tuple, int] = {}
    for i, (_, t) in enumerate(train):
        for g in grams(t):
            owner.setdefault(g, i)
    expected = []
    for _, _, t in held_out:
        owned = Counter(owner[g] for g in grams(t) if g in owner)
        expected.append(f"t{min(owned, key=lambda i: (-owned[i], i))}")
    assert [closest for *_, closest in at_once] == expected
    # Rows added in any order (the stage streams them unsorted) give the same index: owners are the smallest row_seq.
    shuffled = TrainingNgrams(SplitConfig(), [t for *_, t in held_out])
    rows = pl.DataFrame({"row_seq": range(len(train)), "text": [t for _, t in train]})
    for lo in (20, 10, 0):
        shuffled.add(rows.slice(lo, 10).reverse())
    assert [f"t{seq}" for seq in shuffled.overlapping(np.arange(len(held_out)))["closest"]] == expected


def test_prompt_keys_first_turn_long_follow_ups_and_optional_system_prompt():
    rows = _frame([
        ("sft", [{"role": "system", "content": "Be brief."}, u("What is the capital of France?"), a("Paris."),
                 u("Why?"), a("History."), u("And which river runs through that city?"), a("The Seine.")], None),
        ("preference", [u("Hi"), a("Hello!"), u("tell me")], ["A", "B"]),
    ])
    keys = prompt_keys(rows, SplitConfig())
    assert keys.rows() == [(0, "What is the capital of France?"), (0, "And which river runs through that city?"),
                           (1, "Hi")]
    with_system = prompt_keys(rows, SplitConfig(prompt_system=True, prompt_min_tokens=1))
    assert with_system.filter(pl.col("row") == 0)["key"].to_list() == [
        "Be brief.\nWhat is the capital of France?", "Be brief.\nWhy?", "Be brief.\nAnd which river runs through that city?"]
    assert with_system.filter(pl.col("row") == 1)["key"].to_list() == ["\nHi", "\ntell me"]


def test_same_question_under_another_system_prompt_shares_a_group_unless_configured(tmp_path, make_cfg):
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join(json.dumps({"messages": ([{"role": "system", "content": sys_}] if sys_ else []) + [
        u("How many legs does a spider have?"), a(ans)]}) for sys_, ans in
        [(None, "Eight."), ("You answer in one short sentence.", "A spider has eight legs.")]), encoding="utf-8")
    for system, groups in (("false", 1), ("true", 2)):
        cfg = make_cfg(f"data.ingest.inputs=[{f}]", f"data.split.prompt_system={system}", root=tmp_path / system)
        run_data_plane(cfg)
        assert query(cfg, "SELECT count(DISTINCT group_id) FROM split_groups")[0][0] == groups


def test_a_big_group_goes_to_train_and_the_targets_still_hold():
    s = SplitConfig(validation=0.1, test=0.1, max_group_share=0.1)
    n = 1000  # rows 0..199 share one key (a big group), the rest are on their own
    rows = pl.DataFrame({"row_id": [f"r{i:04d}" for i in range(n)], "split": [None] * n},
                        schema={"row_id": pl.String, "split": pl.String})
    edge_rows = np.arange(n)
    edge_keys = np.where(edge_rows < 200, 0, edge_rows)
    held = {"validation": [], "test": []}
    for seed in range(20):
        out, bridges, stats = assign(rows, edge_rows, edge_keys, n, s.model_copy(update={"seed": seed}))
        assert stats["groups"] == 801 and stats["largest_group"] == 200 and bridges.is_empty()
        assert set(out["split"][:200]) == {"train"}
        for split in held:
            held[split].append((out["split"] == split).sum())
    # 800 rows are eligible: each drawn with 0.125 so that 10 % of all 1000 rows are held out, on average.
    for split, counts in held.items():
        assert 94 <= np.mean(counts) <= 106, (split, counts)


def test_old_rows_never_move_new_rows_follow_their_group_and_bridges_are_recorded(tmp_path, make_cfg):
    pool = _pool("en")
    first = tmp_path / "first.json"
    first.write_text(json.dumps([{"instruction": q, "input": "", "output": a_} for q, a_ in pool[:80]]),
                     encoding="utf-8")
    settings = ("data.split.validation=0.25", "data.split.test=0.25")
    cfg = make_cfg(f"data.ingest.inputs=[{first}]", *settings)
    run_data_plane(cfg)
    rows = query(cfg, "SELECT r.row_id, r.raw, a.split FROM raw_rows r JOIN split_assignments a "
                      "ON a.cluster_id = r.row_id ORDER BY r.row_seq")
    before = {row_id: split for row_id, _, split in rows}
    record = {row_id: json.loads(raw) for row_id, raw, _ in rows}
    order = list(before)  # by row_seq
    train_row = next(r for r in order if before[r] == "train")
    held_row = next(r for r in order[order.index(train_row):] if before[r] != "train")
    other_held = next(r for r in order if before[r] != "train" and r != held_row)
    t, h, o = record[train_row], record[held_row], record[other_held]

    second = tmp_path / "second.json"
    second.write_text(json.dumps([
        {"instruction": pool[100][0], "input": "", "output": pool[100][1], "history": [[o["instruction"], o["output"]]]},
        {"instruction": o["instruction"], "input": "", "output": pool[101][1]},  # asked again, another answer
        {"instruction": h["instruction"], "input": "", "output": h["output"],  # joins a train and a held-out group
         "history": [[t["instruction"], t["output"]]]},
        *[{"instruction": q, "input": "", "output": a_} for q, a_ in pool[120:140]],
    ]), encoding="utf-8")
    cfg2 = make_cfg(f"data.ingest.inputs=[{first},{second}]", *settings)
    stats = run_data_plane(cfg2)["split"].stats
    after = dict(query(cfg2, "SELECT cluster_id, split FROM split_assignments"))
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 23
    new = dict(query(cfg2, "SELECT r.row_number, a.split FROM raw_rows r JOIN source_files f USING (file_id) "
                           "JOIN split_assignments a ON a.cluster_id = r.row_id WHERE f.path LIKE '%second.json'"))
    assert new[1] == new[2] == before[other_held]
    assert new[3] == "train"  # the split of the earlier of the two groups it joined

    bridged = query(cfg2, "SELECT r.row_number, b.split, b.group_id, b.joined_groups, b.joined_splits "
                          "FROM bridged_rows b JOIN raw_rows r USING (row_id)")
    assert bridged == [(3, "train", train_row, [train_row, held_row], ["train", before[held_row]])]
    assert stats["bridged_rows"] == 1
    # Only the new questions are signed (the follow-up in row 1 and the 20 new rows); old keys are read back.
    assert stats["newly_signed_prompt_keys"] == 21
    # The held-out row now overlaps the bridge in training: reported, and left out of what evaluation reads.
    assert query(cfg2, "SELECT row_id FROM contaminated_examples") == [(held_row,)]
    assert query(cfg2, "SELECT count(*) FROM sft_examples WHERE example_id = ?", [held_row])[0][0] == 0
    assert query(cfg2, "SELECT split, kind, reason, rows FROM eval_exclusions") == [
        (before[held_row], "sft", "overlaps training", 1)]


def test_quality_views_answer_the_questions(make_cfg):
    cfg = make_cfg()  # the embedded sample data
    run_data_plane(cfg)
    summary = query(cfg, "SELECT source, raw, accepted, rejected, duplicates, pending FROM quality_summary")
    assert len(summary) == 7
    for source, raw, accepted, rejected, dups, pending in summary:
        assert raw == accepted + rejected + dups and pending == 0, source
    assert all(b for (b,) in query(cfg, "SELECT balanced FROM row_conservation"))
    assert query(cfg, "SELECT count(*) FROM contaminated_examples")[0][0] == 0
    reasons = {r for (r,) in query(cfg, "SELECT DISTINCT reason FROM rejections_by_reason")}
    assert {"malformed_json", "empty_turn", "identical_responses", "wrong_type",
            "no_assistant_reply"} <= reasons
    for view in ("duplicate_clusters", "split_balance", "length_distribution", "length_stats", "language_mix",
                 "preference_pairs", "sft_examples", "feedback_examples", "prompt_groups"):
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
    assert query(cfg, "SELECT count(*) FROM cluster_members WHERE method = 'near'")[0][0] > 25
    # Every accepted text was signed by a shard (the split stage adds its prompt keys' signatures to the table).
    assert query(cfg, "SELECT count(DISTINCT content_hash) FROM minhash_signatures "
                      "WHERE content_hash IN (SELECT content_hash FROM clean_rows)")[0][0] == \
        query(cfg, "SELECT count(DISTINCT content_hash) FROM clean_rows WHERE reason IS NULL")[0][0]


@pytest.mark.parametrize("override, field", [("data.dedup.threshold=1.5", "data.dedup.threshold"),
                                             ("data.split.validation=0.99", "data.split"),
                                             ("data.dedup.num_perm=lots", "data.dedup.num_perm"),
                                             ("data.dedup.typo=1", "data.dedup.typo")])
def test_invalid_config_names_the_field(override, field):
    from tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


CLEAN_COLUMNS = "row_id, kind, source, row_seq, messages, responses, tools, dedup_text, n_chars, language, reason, " \
                "detail, label"


def _store_once_inputs(tmp_path):
    files = {
        "plain.jsonl": [{"instruction": "What is 2+2?", "input": "", "output": "It is 4."},  # clean changes nothing
                        {"instruction": "Cafe\u0301 please  ", "input": "", "output": "Sure.  \r\nDone"}],
        "pairs.jsonl": [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
                        {"prompt": "Capital of Spain?", "chosen": "Madrid.  ", "rejected": "Porto."}],
        "chat.jsonl": [{"messages": [{"role": "system", "content": "  "}, u("Hello?"), a("Hi.")]},
                       {"messages": [u("Weather in Paris?"), a("Sunny.")],
                        "tools": [{"type": "function", "function": {"name": "forecast", "parameters": {}}}]}],
    }
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return ",".join(str(tmp_path / name) for name in files)


def _clean_rows_by_id(cfg):
    from tasks.core.warehouse import open_warehouse

    with open_warehouse(cfg.warehouse_url, read_only=True) as con:
        return {r["row_id"]: r for r in con.sql(f"SELECT {CLEAN_COLUMNS} FROM clean_rows").pl().to_dicts()}


def test_clean_stores_a_text_only_where_cleaning_changed_it(tmp_path, make_cfg):
    from tasks.core.warehouse import open_warehouse
    from tasks.data.clean import PARSED_ROWS, run_clean
    from tasks.data.ingest import run_ingest

    cfg = make_cfg(f"data.ingest.inputs=[{_store_once_inputs(tmp_path)}]")
    run_clean(cfg, run_ingest(cfg))
    with open_warehouse(cfg.warehouse_url, read_only=True) as con:
        expected = clean_frame(con.sql(PARSED_ROWS).pl(), cfg).to_dicts()
        stored = {f"{source}:{n}": rest for source, n, *rest in con.execute(
            "SELECT s.source, r.row_number, c.messages IS NULL, c.messages_as_parsed, c.responses IS NULL, "
            "c.responses_as_parsed, c.tools IS NULL FROM clean_results c JOIN raw_rows r USING (row_id) "
            "JOIN source_files s USING (file_id)").fetchall()}
        as_parsed = con.execute("SELECT count(*) FROM clean_rows c JOIN parsed_rows p USING (row_id) "
                                "WHERE c.messages = p.messages").fetchone()[0]
        stored_texts = con.execute("SELECT count(dedup_text) FROM clean_results").fetchone()[0]
        compression = con.execute("SELECT DISTINCT compression FROM pragma_storage_info('clean_results') "
                                  "WHERE column_name = 'messages' AND segment_type = 'VARCHAR'").fetchall()
    assert compression == [("ZSTD",)]  # the text clean stores is written in ZSTD, however few rows
    assert stored_texts == 0  # every dedup_text is its turns' conversation_text (sql/views.sql)
    # (messages NULL, as parsed, responses NULL, as parsed, tools NULL): NULL only where the flag says as parsed.
    assert stored == {
        "plain:1": [True, True, False, False, True],  # an SFT row's answers: [] where ingest has NULL
        "plain:2": [False, False, False, False, True],  # NFC, CRLF and trailing spaces normalised
        "pairs:1": [True, True, True, True, True],
        "pairs:2": [True, True, False, False, True],  # "Madrid.  " trimmed
        "chat:1": [False, False, False, False, True],  # the empty system prompt dropped
        "chat:2": [True, True, False, False, True],  # its tools come from parsed_rows too
    }
    assert as_parsed == 4
    # Through the view every row reads exactly what clean computed, stored or not.
    assert _clean_rows_by_id(cfg) == {r["row_id"]: r for r in expected}
    got = _clean_rows_by_id(cfg)
    changed = next(r for r in got.values() if r["source"] == "plain" and r["row_seq"] == 2)
    assert compact_messages(changed["messages"]) == [u("Café please"), a("Sure.\nDone")]
    assert [json.loads(r["tools"]) for r in got.values() if r["tools"]][0][0]["function"]["name"] == "forecast"


def test_a_warehouse_with_the_old_clean_rows_table_opens_with_its_rows(tmp_path, make_cfg):
    import duckdb

    from tasks.core.warehouse import open_warehouse
    from tasks.data.clean import run_clean
    from tasks.data.ingest import run_ingest

    cfg = make_cfg(f"data.ingest.inputs=[{_store_once_inputs(tmp_path)}]")
    ingest = run_ingest(cfg)
    first = run_clean(cfg, ingest)
    before = _clean_rows_by_id(cfg)
    with duckdb.connect(cfg.warehouse_url) as con:  # the layout before: a clean_rows table holding every row's turns
        con.execute("CREATE TABLE old_clean AS SELECT * FROM clean_rows")
        con.execute("DROP VIEW clean_rows")
        con.execute("DROP TABLE clean_results")
        con.execute("""CREATE TABLE clean_rows (row_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL,
            source VARCHAR NOT NULL, row_seq BIGINT NOT NULL, messages chat_message[], responses VARCHAR[],
            tools VARCHAR, dedup_text VARCHAR, content_hash VARCHAR, n_chars BIGINT, language VARCHAR,
            reason VARCHAR, detail VARCHAR, label BOOLEAN)""")
        con.execute("INSERT INTO clean_rows BY NAME SELECT * FROM old_clean")
        con.execute("DROP TABLE old_clean")
    with open_warehouse(cfg.warehouse_url) as con:
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables "
                                 "WHERE table_name IN ('clean_rows', 'clean_results')").fetchall())
        assert kinds == {"clean_rows": "VIEW", "clean_results": "BASE TABLE"}
        assert con.execute("SELECT count(*) FROM clean_results WHERE messages IS NULL OR messages_as_parsed "
                           "OR tools IS NOT NULL").fetchone()[0] == 1  # only the row with tools kept them
    assert _clean_rows_by_id(cfg) == before
    again = run_clean(cfg, ingest)
    assert _clean_rows_by_id(cfg) == before and again.fingerprint == first.fingerprint


def test_a_warehouse_with_wide_signatures_signs_its_texts_again_in_eight_bits(make_cfg):
    import duckdb

    from tasks.core.warehouse import open_warehouse
    from tasks.data.dedup import deduplicate

    cfg = make_cfg(f"data.ingest.inputs=[{SHAREGPT}]")
    clean = run_data_plane(cfg)["quality"]
    members = sorted(query(cfg, "SELECT row_id, cluster_id, method FROM cluster_members"))
    texts = query(cfg, "SELECT count(*) FROM minhash_signatures")[0][0]
    with duckdb.connect(cfg.warehouse_url) as con:  # the layout before: 32 bits a value, keyed
        con.execute("DROP TABLE minhash_signatures")
        con.execute("CREATE TABLE minhash_signatures (content_hash VARCHAR NOT NULL, params VARCHAR NOT NULL, "
                    "signature UINTEGER[] NOT NULL, PRIMARY KEY (content_hash, params))")
        con.execute("INSERT INTO minhash_signatures VALUES ('abc', 'p128-old', [1, 2, 3])")
    with open_warehouse(cfg.warehouse_url) as con:
        assert con.execute("SELECT data_type FROM information_schema.columns WHERE table_name = "
                           "'minhash_signatures' AND column_name = 'signature'").fetchone()[0] == "UTINYINT[]"
        assert con.execute("SELECT count(*) FROM minhash_signatures").fetchone()[0] == 0
    again = deduplicate(cfg, clean)
    assert again.stats["newly_signed"] > 0
    assert sorted(query(cfg, "SELECT row_id, cluster_id, method FROM cluster_members")) == members
    assert 0 < query(cfg, "SELECT count(*) FROM minhash_signatures")[0][0] < texts  # the split's keys: not yet
    assert deduplicate(cfg, clean).stats["newly_signed"] == 0  # stored once: a rerun signs nothing, adds nothing
    stored, distinct = query(cfg, "SELECT count(*), count(DISTINCT (content_hash, params)) FROM minhash_signatures")[0]
    assert stored == distinct == query(cfg, "SELECT count(DISTINCT content_hash) FROM curated_rows "
                                            "WHERE reason IS NULL")[0][0]


def test_texts_signed_a_few_at_a_time_store_what_one_slice_stores(make_cfg, monkeypatch):
    from tasks.core.warehouse import open_warehouse
    from tasks.data import dedup

    cfg = make_cfg()
    texts = [r["instruction"] + " " + r["output"] for r in json.loads(ALPACA_EN.read_text())[:25]]
    hashes = [f"h{i}" for i in range(len(texts))]
    with open_warehouse(cfg.warehouse_url) as con:
        whole, signed = dedup.signatures_of(con, texts, hashes, cfg.data.dedup)
        assert signed == 25
        con.execute("DELETE FROM minhash_signatures")
        monkeypatch.setattr(dedup, "SIGN_SLICE", 4)
        sliced, signed = dedup.signatures_of(con, texts, hashes, cfg.data.dedup)
        assert signed == 25 and np.array_equal(sliced, whole)
        monkeypatch.setattr(dedup, "SIGN_SLICE", 10**9)
        stored, signed = dedup.signatures_of(con, texts, hashes, cfg.data.dedup)  # read back, none signed
        assert signed == 0 and np.array_equal(stored, whole)


def test_duckdb_memory_limit_comes_from_the_environment_or_is_half_a_gib_a_core(make_cfg, monkeypatch):
    from tasks.core.warehouse import MEMORY_LIMIT_ENV, open_warehouse

    cfg = make_cfg()
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1GiB")
    with open_warehouse(cfg.warehouse_url) as con:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.replace(" ", "") in ("1.0GiB", "1024.0MiB", "1GiB"), limit
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    with open_warehouse(cfg.warehouse_url) as con:  # unset: 512 MiB per core, not DuckDB's 80 % of RAM
        default = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    half_gib_a_core = duckdb.connect(config={"memory_limit": f"{512 * len(os.sched_getaffinity(0))}MiB"})
    assert default == half_gib_a_core.execute("SELECT current_setting('memory_limit')").fetchone()[0]
