"""Ingest: every supported format and file type, provenance, idempotence, atomicity, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SHARED_DATA, query, run_data_plane

from tasks.core.warehouse import compact_messages
from tasks.data import formats
from tasks.data.ingest import NothingToIngest, run_ingest

SHARED_FILES = {
    "instruct_alpaca_en/alpaca_en_demo.json": ("alpaca", 999),
    "instruct_alpaca_en/alpaca_tiny.json": ("alpaca", 100),
    "instruct_alpaca_zh/alpaca_zh_demo.json": ("alpaca", 1000),
    "chat_sharegpt/fastchat_dummy_conversation.json": ("sharegpt", 500),
    "chat_messages/kto_en_demo.json": ("messages", 300),
    "preference_sharegpt/dpo_en_demo.json": ("preference", 300),
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("rel", sorted(SHARED_FILES))
def test_shared_files_ingest_in_their_format(make_cfg, rel):
    fmt, n = SHARED_FILES[rel]
    cfg = make_cfg(f"data.ingest.inputs=[{SHARED_DATA / rel}]")
    result = run_ingest(cfg)
    assert result.stats["new_rows"] == n
    [(data_format, n_rows, status)] = query(cfg, "SELECT data_format, n_rows, status FROM source_files")
    assert (data_format, n_rows, status) == (fmt, n, "ingested")
    # Verbatim raw rows with provenance, and each parsed into the canonical roles.
    rows = query(cfg, "SELECT r.row_number, r.raw, p.kind, p.messages, p.reason, p.label FROM raw_rows r "
                      "JOIN parsed_rows p USING (row_id) ORDER BY r.row_number")
    assert [r[0] for r in rows] == list(range(1, n + 1))
    original = json.loads((SHARED_DATA / rel).read_text(encoding="utf-8"))
    assert json.loads(rows[0][1]) == original[0]
    parsed = [r for r in rows if r[4] is None]
    assert parsed, "no row parsed"
    labelled = rel.endswith("kto_en_demo.json")  # KTO rows: messages + label, kept apart from SFT as feedback
    for _, _, kind, msgs, _, _ in parsed:
        assert kind == ("preference" if fmt == "preference" else "feedback" if labelled else "sft")
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant"}
    if labelled:
        negatives = sum(1 for r in original if r.get("label") is False)
        assert sum(1 for r in rows if r[5] is False) == negatives > 0


def test_alpaca_history_system_and_input_are_kept():
    parsed = formats.normalize({"instruction": "Translate", "input": "bonjour", "output": "hello",
                                "system": "Be brief.", "history": [["hi", "hello!"]]}, "alpaca")
    kind, msgs = parsed.kind, parsed.messages
    assert kind == "sft"
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[3]["content"] == "Translate\n\nbonjour"


def test_preference_variants(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    _write_jsonl(d / "explicit.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    _write_jsonl(d / "implicit.jsonl", [{
        "chosen": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Seven."}]}])
    _write_jsonl(d / "ranked.jsonl", [{"instruction": "Rate", "input": "", "output": ["best", "good", "bad"]}])
    _write_jsonl(d / "messages_pref.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}],
                                              "chosen": {"role": "assistant", "content": "Hello!"},
                                              "rejected": {"role": "assistant", "content": "Go away."}}])
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_data_plane(cfg)
    got = query(cfg, "SELECT source, p.kind, p.messages, p.responses FROM parsed_rows p JOIN raw_rows USING (row_id) "
                     "JOIN source_files USING (file_id) ORDER BY source")
    by_source = {s: (k, compact_messages(m), r) for s, k, m, r in got}
    assert by_source["explicit"] == ("preference", [{"role": "user", "content": "2+2?"}], ["4", "5"])
    assert by_source["implicit"] == ("preference", [{"role": "user", "content": "Name a color."}], ["Blue.", "Seven."])
    assert by_source["ranked"][2] == ["best", "good", "bad"]
    assert by_source["messages_pref"][2] == ["Hello!", "Go away."]
    # A ranked list of three gives three (better, worse) pairs.
    pairs = query(cfg, "SELECT chosen, rejected FROM preference_pairs WHERE source = 'ranked' ORDER BY ALL")
    assert pairs == [("best", "bad"), ("best", "good"), ("good", "bad")]


def test_csv_parquet_and_gzip(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    (d / "rows.csv").write_text('instruction,input,output\n"Say hi","","Hi!"\n"Add 1 and 2","","3"\n', encoding="utf-8")
    convs = [[{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]]
    pq.write_table(pa.Table.from_pylist([{"conversations": c} for c in convs]), d / "chat.parquet")
    with gzip.open(d / "msgs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}) + "\n")
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_data_plane(cfg)
    got = dict(query(cfg, "SELECT file_type || ':' || data_format, n_rows FROM source_files"))
    assert got == {"csv:alpaca": 2, "parquet:sharegpt": 1, "jsonl:messages": 1}
    assert query(cfg, "SELECT count(*) FROM sft_examples")[0][0] == 4


def _write_bad_inputs(d):
    """One file per way an input goes wrong; returns the lines of mixed.jsonl."""
    good = {"instruction": "What is 1 plus 1?", "input": "", "output": "2"}
    lines = [json.dumps(good).encode(), b'{"instruction": "truncated", "outp',
             json.dumps({"instruction": "caf\u00e9", "input": "", "output": "ok"}).encode().replace(b"caf\\u00e9", b"caf\xe9"),
             json.dumps({"instruction": "Wrong type", "input": "", "output": ["a"]}).encode(),
             json.dumps({"instruction": "x", "input": "", "output": 7}).encode()]
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "corrupt.jsonl.gz").write_bytes(gzip.compress(json.dumps(good).encode())[:-12])
    _write_jsonl(d / "unknown.jsonl", [{"foo": 1, "bar": 2}])
    _write_jsonl(d / "wrongtypes.jsonl", [{"conversations": "not a list"}, {"conversations": [{"from": "human", "value": 3}]},
                                         {"conversations": [{"from": "alien", "value": "hi"}]}])
    (d / "truncated.json").write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instr', encoding="utf-8")
    return lines


def test_bad_input_is_quarantined_with_reasons_and_the_run_goes_on(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    lines = _write_bad_inputs(d)
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_data_plane(cfg)

    files = {p.rsplit("/", 1)[1]: (s, r) for p, s, r in query(cfg, "SELECT path, status, reason FROM source_files")}
    assert files["empty.jsonl"] == ("quarantined", "empty_file")
    assert files["corrupt.jsonl.gz"] == ("quarantined", "corrupt_gzip")
    assert files["mixed.jsonl"] == ("ingested", None)
    reasons = dict(query(cfg, "SELECT f.path.split('/')[-1] || ':' || d.row_number, d.reason FROM row_dispositions d "
                              "JOIN source_files f USING (file_id)"))
    assert reasons["mixed.jsonl:1"] is None
    assert reasons["mixed.jsonl:2"] == "malformed_json"
    assert reasons["mixed.jsonl:3"] == "invalid_utf8"
    # The undecodable row is still kept, byte for byte.
    assert query(cfg, "SELECT raw_bytes FROM raw_rows WHERE row_number = 3 AND raw IS NULL")[0][0] == lines[2]
    assert reasons["mixed.jsonl:4"] == "wrong_type"
    assert reasons["mixed.jsonl:5"] == "wrong_type"
    assert reasons["bom.jsonl:1"] is None
    assert reasons["unknown.jsonl:1"] == "unknown_format"
    assert [reasons[f"wrongtypes.jsonl:{i}"] for i in (1, 2, 3)] == ["wrong_type", "wrong_type", "unsupported_role"]
    assert reasons["truncated.json:1"] == "malformed_json"
    # Conservation holds on every file, and the good rows made it through.
    assert all(b for (b,) in query(cfg, "SELECT balanced FROM row_conservation"))
    assert query(cfg, "SELECT count(*) FROM row_dispositions WHERE status = 'accepted'")[0][0] >= 1


def test_a_run_with_nothing_usable_fails_naming_the_file(tmp_path, make_cfg):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"broken\n', encoding="utf-8")
    with pytest.raises(NothingToIngest, match="bad.jsonl"):
        run_ingest(make_cfg(f"data.ingest.inputs=[{bad}]"))


def test_reingest_is_idempotent_and_a_changed_file_is_a_new_version(tmp_path, make_cfg):
    f = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)])
    cfg = make_cfg(f"data.ingest.inputs=[{f}]")
    assert run_ingest(cfg).stats["new_rows"] == 5
    assert run_ingest(cfg).stats["new_rows"] == 0
    assert query(cfg, "SELECT count(*) FROM raw_rows")[0][0] == 5
    _write_jsonl(f, [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(6)])
    assert run_ingest(cfg).stats["new_rows"] == 6
    assert query(cfg, "SELECT count(DISTINCT content_sha256), count(DISTINCT path) FROM source_files")[0] == (2, 1)
    # The unchanged rows of the new version are exact duplicates of the first version's rows.
    from tasks.data.clean import run_clean
    from tasks.data.dedup import deduplicate

    deduplicate(cfg, run_clean(cfg, {}))
    assert query(cfg, "SELECT count(*) FROM row_dispositions WHERE status = 'duplicate'")[0][0] == 5


def test_a_crash_mid_file_leaves_no_partial_rows(tmp_path, make_cfg, monkeypatch):
    f = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(50)])
    cfg = make_cfg(f"data.ingest.inputs=[{f}]", "data.ingest.bulk=false")  # the per-line path normalises per row
    from tasks.data import formats as fmt_module

    real_normalize = fmt_module.normalize
    calls = {"n": 0}

    def crash_at_row_30(record, fmt):  # raw rows of the file are already inserted by then
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("simulated crash mid-file")
        return real_normalize(record, fmt)

    assert _crash_then_rerun(cfg, monkeypatch, fmt_module, "normalize", crash_at_row_30).stats["new_rows"] == 50


def _crash_then_rerun(cfg, monkeypatch, module, name, crashing) -> dict:
    """Ingest with module.name replaced by a crashing one: nothing of the file is kept; then ingest again."""
    monkeypatch.setattr(module, name, crashing)
    with pytest.raises(Exception, match="simulated crash"):
        run_ingest(cfg)
    monkeypatch.undo()
    assert query(cfg, "SELECT count(*) FROM source_files")[0][0] == 0
    assert query(cfg, "SELECT count(*) FROM raw_rows")[0][0] == 0
    return run_ingest(cfg)


def test_outputs_under_a_storage_root_inside_the_input_folder_are_not_ingested(tmp_path, make_cfg):
    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)])
    cfg = make_cfg(f"data.ingest.inputs=[{tmp_path}]", root=tmp_path / "runs")
    run_data_plane(cfg)  # writes Parquet signature shards under tmp_path/runs
    assert list((tmp_path / "runs").rglob("*.parquet"))
    assert run_ingest(cfg).stats["files"] == 1
    assert [p for (p,) in query(cfg, "SELECT path FROM source_files")] == [str(tmp_path / "a.jsonl")]


def test_an_input_folder_inside_the_storage_root_is_read(tmp_path, make_cfg):
    raw = tmp_path / "runs" / "raw"
    raw.mkdir(parents=True)
    _write_jsonl(raw / "b.jsonl", [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)])
    cfg = make_cfg(f"data.ingest.inputs=[{raw}]", root=tmp_path / "runs")
    run_data_plane(cfg)
    assert run_ingest(cfg).stats["files"] == 1  # the outputs now under runs/ are not inputs
    assert [p for (p,) in query(cfg, "SELECT path FROM source_files")] == [str(raw / "b.jsonl")]


INGEST_AND_REPORT = """
import json, sys
from tasks.core.config import load_config
from tasks.data.ingest import run_ingest
print(json.dumps(run_ingest(load_config(None, sys.argv[1:])).stats))
"""


def test_unreadable_looping_and_too_deep_files_are_quarantined_and_the_run_goes_on(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    _write_jsonl(d / "good.jsonl", [{"instruction": "What is 1 plus 1?", "input": "", "output": "2"}])
    _write_jsonl(d / "locked.jsonl", [{"instruction": "hidden", "input": "", "output": "x"}]).chmod(0)
    (d / "loop.jsonl").symlink_to("loop.jsonl")
    (d / "ping.json").symlink_to("pong.json")
    (d / "pong.json").symlink_to("ping.json")
    (d / "deep.json").write_text("[" * 1000 + '{"instruction": "x", "output": "y"}' + "]" * 1000)
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    # Root reads any file whatever its mode: drop the capabilities that allow it, as an ordinary user has none.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    run = subprocess.run([*drop, sys.executable, "-c", INGEST_AND_REPORT, f"storage_root={cfg.root}",
                          f"data.ingest.inputs=[{d}]"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    files = {p.rsplit("/", 1)[1]: (s, r, detail) for p, s, r, detail in
             query(cfg, "SELECT path, status, reason, detail FROM source_files")}
    assert {name: f[:2] for name, f in files.items()} == {
        "good.jsonl": ("ingested", None), "locked.jsonl": ("quarantined", "unreadable_file"),
        "loop.jsonl": ("quarantined", "symlink_loop"), "ping.json": ("quarantined", "symlink_loop"),
        "pong.json": ("quarantined", "symlink_loop"), "deep.json": ("quarantined", "too_deep")}
    assert "ermission denied" in files["locked.jsonl"][2]
    assert query(cfg, "SELECT count(*) FROM quarantined_files")[0][0] == 5
    assert json.loads(run.stdout.strip().splitlines()[-1])["new_rows"] == 1


def test_glob_characters_in_file_names_read_exactly_that_file(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    for name, word in (("a.csv", "plain"), ("ab.csv", "longer"), ("a*.csv", "star"), ("a?.csv", "question")):
        (d / name).write_text(f'instruction,input,output\n"{word}","","ok"\n', encoding="utf-8")
    for name, word in (("p1.parquet", "one"), ("p[1].parquet", "bracket")):
        pq.write_table(pa.table({"instruction": [word], "output": ["ok"]}), d / name)
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_ingest(cfg)
    got = dict(query(cfg, "SELECT f.path.split('/')[-1], list(json_extract_string(r.raw, '$.instruction') "
                          "ORDER BY r.row_number) FROM raw_rows r JOIN source_files f USING (file_id) GROUP BY 1"))
    assert got == {"a.csv": ["plain"], "ab.csv": ["longer"], "a*.csv": ["star"], "a?.csv": ["question"],
                   "p1.parquet": ["one"], "p[1].parquet": ["bracket"]}


def test_bad_csv_rows_are_quarantined_row_by_row_with_their_line(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    lines = [b"instruction,input,output", b'"q1","","a1"', b'"q2","","a2","extra"', b'"q\xff3","","a3"',
             b'"q4","","a4"', b'"q5",""']
    (d / "rows.csv").write_bytes(b"\n".join(lines) + b"\n")
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_data_plane(cfg)
    assert query(cfg, "SELECT status, n_rows FROM source_files") == [("ingested", 5)]
    rows = query(cfg, "SELECT r.row_number, r.raw, r.raw_bytes, p.reason, p.detail FROM raw_rows r "
                      "JOIN parsed_rows p USING (row_id) ORDER BY r.row_number")
    assert [(r[0], r[3]) for r in rows] == [(1, None), (2, "malformed_csv"), (3, "invalid_utf8"), (4, None),
                                           (5, "malformed_csv")]
    assert rows[1][1] == lines[2].decode() and "line 3" in rows[1][4]
    assert rows[2][1] is None and rows[2][2] == lines[3] and "line 4" in rows[2][4]  # kept byte for byte
    assert "line 6" in rows[4][4]
    assert json.loads(rows[3][1])["instruction"] == "q4"
    assert query(cfg, "SELECT raw, accepted, rejected, balanced FROM row_conservation") == [(5, 2, 3, True)]


def test_undecodable_parquet_binary_is_invalid_utf8_not_text(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"instruction": pa.array([b"fine question", b"bad \xff byte"], pa.binary()),
                             "output": ["fine answer", "answer"]}), d / "bin.parquet")
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_data_plane(cfg)
    rows = query(cfg, "SELECT r.row_number, p.reason, p.messages FROM raw_rows r JOIN parsed_rows p USING (row_id) "
                      "ORDER BY 1")
    assert rows[0][1] is None and rows[0][2][0]["content"] == "fine question"
    assert rows[1][:2] == (2, "invalid_utf8")
    assert query(cfg, "SELECT count(*) FROM sft_examples WHERE messages[1].content LIKE '%xFF%'")[0][0] == 0


def test_a_broken_json_array_is_one_malformed_row_not_its_lines(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    _write_jsonl(d / "good.jsonl", [{"instruction": "What is 1 plus 1?", "input": "", "output": "2"}])
    # The last element's line is valid JSON on its own; read line by line it would become a row of its own.
    (d / "broken.json").write_text('[\n{"instruction": "a", "input": "", "output": "b"},,\n'
                                   '{"instruction": "c", "input": "", "output": "d"}\n]\n', encoding="utf-8")
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    run_ingest(cfg)
    rows = query(cfg, "SELECT r.row_number, p.reason, p.detail FROM raw_rows r JOIN parsed_rows p USING (row_id) "
                      "JOIN source_files f USING (file_id) WHERE f.path LIKE '%broken.json'")
    assert len(rows) == 1 and rows[0][:2] == (1, "malformed_json") and "line 2" in rows[0][2]


SIGKILLED_MID_FILE = """
import os, signal, sys
from tasks.core.config import load_config
from tasks.core import warehouse
from tasks.data import ingest

calls = {"n": 0}
real_insert = ingest.insert_columns


def insert_then_die(con, table, columns):
    real_insert(con, table, columns)
    calls["n"] += 1
    if calls["n"] == 5:  # the third file's raw rows are in, its parsed rows not, its transaction still open
        os.kill(os.getpid(), signal.SIGKILL)


ingest.insert_columns = insert_then_die
ingest.run_ingest(load_config(None, sys.argv[1:]))
"""


def test_a_sigkill_mid_file_leaves_whole_files_and_the_rerun_completes(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    for f in range(4):
        _write_jsonl(d / f"part{f}.jsonl", [{"instruction": f"q{f}-{i}", "input": "", "output": f"a{i}"}
                                            for i in range(200)])
    cfg = make_cfg(f"data.ingest.inputs=[{d}]")
    killed = subprocess.run([sys.executable, "-c", SIGKILLED_MID_FILE, f"storage_root={cfg.root}",
                             f"data.ingest.inputs=[{d}]", "data.ingest.bulk=false"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # Only the two committed files, each whole; the lease of the dead process is broken by the next writer.
    files = query(cfg, "SELECT f.path, f.n_rows, count(r.row_id) FROM source_files f LEFT JOIN raw_rows r "
                       "USING (file_id) GROUP BY ALL ORDER BY 1")
    assert [(p.rsplit("/", 1)[1], n, c) for p, n, c in files] == [("part0.jsonl", 200, 200), ("part1.jsonl", 200, 200)]
    assert query(cfg, "SELECT count(*) FROM parsed_rows")[0][0] == 400
    assert run_ingest(cfg).stats["new_rows"] == 400
    assert query(cfg, "SELECT count(*), count(DISTINCT file_id) FROM raw_rows")[0] == (800, 4)
    assert query(cfg, "SELECT count(*) FROM parsed_rows")[0][0] == 800


# ------------------------------------------------------------------ bulk path == per-line path
BULK_SHARED = ["instruct_alpaca_en/alpaca_en_demo.json", "instruct_alpaca_en/alpaca_tiny.json",
               "instruct_alpaca_zh/alpaca_zh_demo.json", "chat_sharegpt/fastchat_dummy_conversation.json",
               "chat_messages/kto_en_demo.json", "preference_sharegpt/dpo_en_demo.json"]
ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _write_bulk_edges(d):
    """Files that test where the bulk path's certainty ends: {name: whether the bulk path takes it}."""
    rows = [{**ALPACA, "instruction": f"q{i}"} for i in range(3)]
    text = [json.dumps(r, ensure_ascii=False) for r in rows]
    (d / "crlf_blank_lines.jsonl").write_bytes(
        ("\r\n".join([text[0], "", "  \t", text[1]]) + "\r\n\n" + text[2]).encode())
    _write_jsonl(d / "optional_fields.jsonl", [
        {**ALPACA, "input": None, "system": ""}, {**ALPACA, "input": " \u3000\x1c", "system": "Be brief."},
        {**ALPACA, "input": "extra", "text": "pre-rendered", "id": 7, "meta": {"tags": ["a"], "score": 1.5}},
        {**ALPACA, "instruction": "Escapes \u0000 😀 \\/ 中文", "history": None, "tools": None}])
    (d / "unicode_escapes.jsonl").write_text(
        '{"instruction": "\\ud83d\\ude00 \\u4e2d \\/ \\"q\\"", "input": "\\t", "output": "a\\nb"}\n', encoding="utf-8")
    _write_jsonl(d / "kto_labels.jsonl", [
        {"messages": [{"role": "User", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "label": True},
        {"messages": [{"role": "system", "content": "S"}, {"role": "human", "content": "Hi"},
                      {"role": "gpt", "content": "Go away"}], "label": False},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "label": None}])
    _write_jsonl(d / "sharegpt_system.jsonl", [
        {"id": "a", "system": "Be kind.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
        {"system": "Ignored", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                                {"from": "gpt", "value": "Hey"}]}])
    _write_jsonl(d / "preference_text.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Math."},
                                               {"prompt": "", "chosen": "same", "rejected": "same"}])
    (d / "gzipped.jsonl.gz").write_bytes(gzip.compress("".join(t + "\n" for t in text).encode()))
    # Rows that are not JSON objects are quarantined one by one beside the bulk rows, as the per-line path does.
    (d / "not_objects_between.jsonl").write_text("\n".join(
        ['[1, 2]', text[0], text[1][: len(text[1]) // 2], '"just a string"', "null", "42", text[2], "{", "[1, 2,]"])
        + "\n", encoding="utf-8")
    _write_jsonl(d / "not_objects.jsonl", [ALPACA, ["a"], "text"])
    _write_jsonl(d / "preference_turns.jsonl", [
        {"conversations": [{"from": "human", "value": "Pick"}], "chosen": {"from": "gpt", "value": "A"},
         "rejected": {"from": "gpt", "value": "B"}}])
    # Each of these holds a row the bulk path cannot be sure of, so the whole file is read line by line.
    (d / "trailing_comma.jsonl").write_text(text[0] + "\n" + text[1][:-1] + ",}\n", encoding="utf-8")
    (d / "nan.jsonl").write_text(text[0][:-1] + ', "score": NaN}\n', encoding="utf-8")
    (d / "huge_number.jsonl").write_text(text[0][:-1] + ', "score": 1e400}\n', encoding="utf-8")
    (d / "duplicate_keys.jsonl").write_text('{"instruction": "a", "instruction": "b", "output": "c"}\n', encoding="utf-8")
    (d / "bare_cr.jsonl").write_bytes((text[0] + "\r" + text[1] + "\n").encode())
    _write_jsonl(d / "null_output.jsonl", [ALPACA, {**ALPACA, "output": None}])
    _write_jsonl(d / "number_output.jsonl", [ALPACA, {**ALPACA, "output": 3}])
    _write_jsonl(d / "tool_turns.jsonl", [{"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}])
    _write_jsonl(d / "content_parts.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                           {"role": "assistant", "content": "Hello"}]}])
    _write_jsonl(d / "transcript_prompt.jsonl", [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "a", "rejected": "b"}])
    _write_jsonl(d / "chosen_from_user.jsonl", [
        {"conversations": [{"from": "human", "value": "Pick"}], "chosen": {"from": "human", "value": "A"},
         "rejected": {"from": "gpt", "value": "B"}}])
    _write_jsonl(d / "empty_conversation.jsonl", [{"messages": []}])
    _write_jsonl(d / "missing_value.jsonl", [{"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}])
    # So many rows that are JSON but not objects come first that the file's format is detected on them alone.
    (d / "leading_non_objects.jsonl").write_text("[1]\n" * formats.DETECTION_SAMPLE + text[0] + "\n", encoding="utf-8")
    _write_jsonl(d / "mixed_layouts.jsonl", [ALPACA, {"messages": [{"role": "user", "content": "Hi"}]}])
    return {"crlf_blank_lines": True, "gzipped": True, "optional_fields": True, "unicode_escapes": True, "kto_labels": True,
            "sharegpt_system": True, "preference_text": True, "preference_turns": True, "not_objects_between": True,
            "not_objects": True}


def _warehouse(cfg) -> dict:
    return {"files": query(cfg, "SELECT * EXCLUDE (ingested_at) FROM source_files ORDER BY file_id"),
            "raw_rows": query(cfg, "SELECT * FROM raw_rows ORDER BY row_id"),
            "parsed_rows": query(cfg, "SELECT * FROM parsed_rows ORDER BY row_id")}


def _both_paths(make_cfg, tmp_path, inputs):
    """Ingest the inputs once in bulk and once line by line, into two warehouses: (which files went bulk, results,
    warehouse contents) for each."""
    out = []
    for bulk in (True, False):
        cfg = make_cfg(f"data.ingest.inputs=[{inputs}]", f"data.ingest.bulk={str(bulk).lower()}",
                       root=tmp_path / f"runs_bulk_{bulk}")
        result = run_ingest(cfg)
        went_bulk = {f["path"].rsplit("/", 1)[1].split(".")[0]: f.get("bulk") for f in result.files}
        out.append((went_bulk, (result.fingerprint, result.stats), _warehouse(cfg)))
    return out


def test_the_bulk_path_writes_what_the_per_line_path_writes_on_the_shared_data(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    for rel in BULK_SHARED:  # as JSON Lines and Parquet, written here from ../shared at run time
        rows = json.loads((SHARED_DATA / rel).read_text(encoding="utf-8"))
        name = rel.rsplit("/", 1)[1].removesuffix(".json")
        _write_jsonl(d / f"{name}.jsonl", rows)
        pq.write_table(pa.Table.from_pylist(rows), d / f"{name}_pq.parquet")
    (bulk_files, bulk_result, bulk_wh), (line_files, line_result, line_wh) = _both_paths(make_cfg, tmp_path, d)
    assert all(bulk_files.values()) and len(bulk_files) == 2 * len(BULK_SHARED)
    assert not any(line_files.values())
    assert bulk_result == line_result
    for table in bulk_wh:
        assert bulk_wh[table] == line_wh[table], table
    assert len(bulk_wh["raw_rows"]) == 2 * sum(SHARED_FILES[rel][1] for rel in BULK_SHARED)


def test_the_bulk_path_writes_what_the_per_line_path_writes_on_bad_and_edge_inputs(tmp_path, make_cfg):
    d = tmp_path / "in"
    d.mkdir()
    _write_bad_inputs(d)
    takes = _write_bulk_edges(d)
    pq.write_table(pa.table({"instruction": pa.array([b"fine", b"bad \xff"], pa.binary()), "output": ["a", "b"]}),
                   d / "binary_column.parquet")
    (bulk_files, bulk_result, bulk_wh), (_, line_result, line_wh) = _both_paths(make_cfg, tmp_path, d)
    assert {name for name, bulk in bulk_files.items() if bulk} == set(takes) | {"bom"}  # a BOM is fine
    assert bulk_result == line_result
    for table in bulk_wh:
        assert bulk_wh[table] == line_wh[table], table


def test_the_bulk_path_writes_what_the_per_line_path_writes_on_the_sample_data(tmp_path, make_cfg):
    from tasks.data.sample_data import write_feedback_sample, write_sample_data

    d = tmp_path / "in"
    write_sample_data(d)
    write_feedback_sample(d)
    (bulk_files, bulk_result, bulk_wh), (_, line_result, line_wh) = _both_paths(make_cfg, tmp_path, d)
    assert any(bulk_files.values())
    assert bulk_result == line_result
    for table in bulk_wh:
        assert bulk_wh[table] == line_wh[table], table


def test_a_failure_inside_a_bulk_file_leaves_no_partial_rows(tmp_path, make_cfg, monkeypatch):
    from tasks.data import bulk_ingest

    f = _write_jsonl(tmp_path / "a.jsonl", [{**ALPACA, "instruction": f"q{i}"} for i in range(50)])
    cfg = make_cfg(f"data.ingest.inputs=[{f}]")
    real_insert = bulk_ingest.insert_rows

    def insert_then_fail(*args):
        real_insert(*args)  # raw and parsed rows are in, the file's transaction still open
        raise RuntimeError("simulated crash after the inserts")

    result = _crash_then_rerun(cfg, monkeypatch, bulk_ingest, "insert_rows", insert_then_fail)
    assert result.stats["new_rows"] == 50 and result.files[0]["bulk"]


def test_a_bulk_file_that_outgrows_the_buffer_pool_cap_is_written_again_without_it(tmp_path, make_cfg, monkeypatch):
    from contextlib import contextmanager

    import duckdb

    from tasks.data import bulk_ingest

    d = tmp_path / "in"
    d.mkdir()
    _write_jsonl(d / "long.jsonl", [{**ALPACA, "instruction": f"question {i} " + "many words " * 300}
                                   for i in range(2000)])
    ran_out = []

    @contextmanager
    def tiny_cap(con, n_rows):  # far below what 2,000 rows of 3 kB need
        old = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        con.execute("SET memory_limit = '4MiB'")
        try:
            yield
        except duckdb.OutOfMemoryException:
            ran_out.append(n_rows)
            raise
        finally:
            con.execute(f"SET memory_limit = '{old}'")

    monkeypatch.setattr(bulk_ingest, "bounded_buffer_pool", tiny_cap)
    (bulk_files, bulk_result, bulk_wh), (_, line_result, line_wh) = _both_paths(make_cfg, tmp_path, d)
    assert ran_out == [2000] and bulk_files == {"long": True}
    assert bulk_result == line_result and bulk_wh == line_wh
    assert len(bulk_wh["raw_rows"]) == 2000
