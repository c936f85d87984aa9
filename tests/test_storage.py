"""The storage root through one code path: a local folder and an s3:// bucket (a local S3 endpoint, see conftest)
behave the same for publishing, fetching, small files, leases and the warehouse."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
from conftest import ROOT, SHARED_DATA, query, run_data_plane

from tasks.core import storage
from tasks.core.config import ConfigError, load_config
from tasks.core.results import ModelResult
from tasks.core.warehouse import WarehouseBusy, open_warehouse


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A storage root of each kind."""
    return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_root")


def _other_machine(monkeypatch, tmp_path, name="other"):
    """Look at the root from a machine with an empty work dir (nothing of it cached locally)."""
    monkeypatch.setenv(storage.WORK_DIR_ENV, str(tmp_path / name))


def test_names(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.WORK_DIR_ENV, str(tmp_path / "wd"))
    assert storage.join("s3://b/runs/", "models", "sft") == "s3://b/runs/models/sft"
    assert storage.join("runs", "x") == str(Path("runs").resolve() / "x")
    assert storage.normalize(f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert storage.local_path("s3://b/runs/x.json") == tmp_path / "wd" / "s3" / "b" / "runs" / "x.json"
    assert storage.local_path(tmp_path / "a") == tmp_path / "a"  # a local place is its own local copy
    assert storage.is_under("s3://b/runs/sample_data/f.json", "s3://b/runs")
    assert not storage.is_under("s3://b/runs2/f.json", "s3://b/runs")
    cfg = load_config(None, ["storage_root=s3://b/runs/"])
    assert cfg.warehouse_url == "s3://b/runs/warehouse.duckdb" and cfg.sample_data_url == "s3://b/runs/sample_data"


def test_config_file_from_a_bucket(s3_root):
    storage.write_text(f"{s3_root}/sft.yaml", f"storage_root: {s3_root}\ndpo:\n  beta: 0.25\n")
    cfg = load_config(f"{s3_root}/sft.yaml", ["sft.max_steps=7"])
    assert (cfg.root, cfg.dpo.beta, cfg.sft.max_steps) == (s3_root, 0.25, 7)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(f"{s3_root}/missing.yaml")


def test_published_folder_is_fetched_whole_on_another_machine(root, tmp_path, monkeypatch):
    url = storage.join(root, "models", "sft", "k1")
    local = storage.local_path(url)
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "weights.bin").write_bytes(b"\0\1" * 1000)
    (local / "result.json").write_text('{"ok": true}')
    assert storage.publish(url) == url and storage.is_published(url)

    _other_machine(monkeypatch, tmp_path)
    adapter = storage.fetch(storage.join(url, "adapter"))  # a folder inside a published one
    assert (adapter / "weights.bin").read_bytes() == b"\0\1" * 1000
    assert json.loads((adapter.parent / "result.json").read_text()) == {"ok": True}
    if root.startswith("s3://"):
        assert tmp_path / "other" in adapter.parents
    else:
        assert adapter == local / "adapter"


def test_unpublished_stage_output_is_not_finished(root, tmp_path, monkeypatch):
    from tasks.training.outputs import StageOutput

    cfg = load_config(None, [f"storage_root={root}"])
    storage.write_text(cfg.url("models", "dpo", "half", "result.json"), "{}")  # written, but the upload was cut short
    _other_machine(monkeypatch, tmp_path)
    out = StageOutput(cfg, "dpo", "half")
    assert out.finished() is None  # so the stage trains again instead of trusting half a folder
    (out.dir / "adapter").mkdir(parents=True, exist_ok=True)
    (out.dir / "adapter" / "w.bin").write_bytes(b"w")
    result = ModelResult(stage="dpo", fingerprint="f", adapter=out.url_of(out.dir / "adapter"))
    assert out.finish(result) == result
    assert out.finished() == result and out.url_of(out.dir / "adapter") == storage.join(out.url, "adapter")


def test_a_model_folder_from_elsewhere_is_fetched_again_when_it_changes(s3_root, tmp_path, monkeypatch):
    """A base model someone uploaded (no .published marker) is fetched as it is, and again after it changes."""
    _other_machine(monkeypatch, tmp_path)
    model = f"{s3_root}-models/llama"
    storage.write_text(f"{model}/config.json", '{"v": 1}')
    before = storage.folder_fingerprint(model)
    assert json.loads((storage.fetch(model) / "config.json").read_text()) == {"v": 1}
    storage.write_text(f"{model}/config.json", '{"v": 22}')
    assert storage.folder_fingerprint(model) != before
    assert json.loads((storage.fetch(model) / "config.json").read_text()) == {"v": 22}


def test_small_files_and_listing(root, tmp_path, monkeypatch):
    runs = storage.join(root, "pipeline-runs", "r1")
    storage.write_text(storage.join(runs, "sft.json"), '{"a": 1}')
    storage.write_text(storage.join(runs, "data.json"), '{"b": 2}')
    assert [Path(u).name for u in storage.list_files(runs, ".json")] == ["data.json", "sft.json"]
    assert storage.list_files(storage.join(root, "pipeline-runs", "nope"), ".json") == []
    assert json.loads(storage.read_text(storage.join(runs, "sft.json"))) == {"a": 1}

    f = storage.join(root, "inputs", "a.jsonl")
    storage.write_text(f, "one\n")
    assert storage.fetch(f).read_text() == "one\n"
    storage.write_text(f, "two\n")  # changed at the source: the next fetch sees it
    assert storage.fetch(f).read_text() == "two\n"
    assert storage.find_files(storage.join(root, "inputs")) == [f]
    with pytest.raises(FileNotFoundError):
        storage.fetch(storage.join(root, "inputs", "missing.jsonl"))


@contextmanager
def _lease_held_by_another_thread(url):
    held, release = threading.Event(), threading.Event()

    def holder():
        with storage.lease(url):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        t.join()


def test_lease_is_exclusive_and_names_its_holder(root):
    url = storage.join(root, "warehouse.duckdb")
    with _lease_held_by_another_thread(url):
        started = time.monotonic()
        with pytest.raises(storage.StorageBusy, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            with storage.lease(url, wait_s=1.5):
                pass
        assert time.monotonic() - started >= 1.5
    with storage.lease(url, wait_s=5):  # free again
        assert storage.exists(url + ".lock")
    assert not storage.exists(url + ".lock")


def test_lease_of_a_dead_process_is_broken(root):
    url = storage.join(root, "warehouse.duckdb")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_text(url + ".lock", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "token": "x", "expires": time.time() + 3600}))
    with storage.lease(url, wait_s=3):
        assert json.loads(storage.read_text(url + ".lock"))["pid"] == os.getpid()


@pytest.mark.parametrize("content", [b"", b"{\"host\": \"ma"])
def test_an_unparseable_lease_is_broken_once_it_is_old(root, monkeypatch, content):
    """An empty or half-written lease (a writer killed between creating and writing it) is stale after the
    lease lifetime, like an unrefreshed one; before that it may still be being written, so it is waited for."""
    url = storage.join(root, "warehouse.duckdb")
    fs, path = fsspec.core.url_to_fs(url + ".lock")
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, content)
    monkeypatch.setattr(storage, "LEASE_TTL_S", 3.0)
    with pytest.raises(storage.StorageBusy):
        with storage.lease(url, wait_s=0.5):
            pass
    time.sleep(3.5)
    with storage.lease(url, wait_s=5):
        assert json.loads(storage.read_text(url + ".lock"))["pid"] == os.getpid()
    assert not storage.exists(url + ".lock")


def test_a_waiting_writer_says_who_holds_the_lease_and_since_when(root, monkeypatch, caplog):
    url = storage.join(root, "warehouse.duckdb")
    monkeypatch.setattr(storage, "LEASE_NOTE_S", 0.5)
    with _lease_held_by_another_thread(url), caplog.at_level("WARNING", logger="sftpipe.storage"):
        with pytest.raises(storage.StorageBusy, match=r"since \d\d:\d\d:\d\d"):
            with storage.lease(url, wait_s=2.5, what="the warehouse"):
                pass
    notes = [r.getMessage() for r in caplog.records if r.name == "sftpipe.storage"]
    assert len(notes) >= 2
    assert all(f"waiting for the warehouse: in use by pid {os.getpid()} on {socket.gethostname()} since" in n
               for n in notes)


WRITER = """
import sys
from tasks.core.warehouse import open_warehouse
url, tag = sys.argv[1], sys.argv[2]
for i in range(6):
    with open_warehouse(url) as con:
        con.execute("INSERT INTO warehouse_meta VALUES (?, ?)", [f"{tag}-{i}", tag])
"""


def test_concurrent_writers_from_two_processes_lose_nothing(root, tmp_path):
    """Each writer works on its own copy and sends it back under the lease: no write overwrites another's."""
    url = storage.join(root, "warehouse.duckdb")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, tag], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), storage.WORK_DIR_ENV: str(tmp_path / tag)},
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    with open_warehouse(url, read_only=True) as con:
        rows = con.execute("SELECT value, count(*) FROM warehouse_meta WHERE key <> 'warehouse_id' "
                           "GROUP BY ALL ORDER BY 1").fetchall()
    assert rows == [("a", 6), ("b", 6)]
    assert not storage.exists(url + ".lock")


def test_busy_warehouse_fails_with_a_clear_message(root):
    url = storage.join(root, "warehouse.duckdb")
    storage.write_text(url + ".lock", json.dumps({"host": "gpu-node-7", "pid": 1, "token": "x",
                                                  "expires": time.time() + 3600}))
    with pytest.raises(WarehouseBusy, match=r"warehouse .*warehouse.duckdb is in use by pid 1 on gpu-node-7"):
        with open_warehouse(url, wait_s=1.0):
            pass


def test_data_plane_on_s3_matches_the_local_one(tmp_path, s3_root, monkeypatch):
    """The same inputs, read from a local folder into a local root and from a bucket into an s3:// root, give the
    same warehouse contents."""
    inputs = str(SHARED_DATA)  # every shared file: Alpaca, ShareGPT, messages, preference; English and Chinese
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(f"{inputs}/", f"{s3_root.removeprefix('s3://')}/raw/", recursive=True)
    local = load_config(None, [f"storage_root={tmp_path / 'runs'}", f"data.ingest.inputs=[{inputs}]"])
    remote = load_config(None, [f"storage_root={s3_root}", f"data.ingest.inputs=[{s3_root}/raw]"])
    a, b = run_data_plane(local), run_data_plane(remote)
    assert len(b["ingest"].files) == len(a["ingest"].files) == 6
    assert all(f["path"].startswith(f"{s3_root}/raw/") for f in b["ingest"].files)
    assert a["split"].fingerprint == b["split"].fingerprint
    assert a["split"].stats == b["split"].stats and b["split"].stats["train"] > 2000
    assert b["split"].warehouse == f"{s3_root}/warehouse.duckdb" and storage.exists(b["split"].warehouse)

    _other_machine(monkeypatch, tmp_path)  # another machine reads the same answers from the bucket
    sql = "SELECT split, count(*) FROM sft_examples GROUP BY ALL ORDER BY ALL"
    assert query(remote, sql) == query(local, sql)


def test_training_on_a_base_model_and_root_in_a_bucket(s3_root, tmp_path, monkeypatch):
    """model.base and storage_root both s3:// URLs: the base is fetched, the adapter published, and another machine
    merges from the bucket alone."""
    import fsspec
    from training_fixtures import STORIES, alpaca_examples, make_warehouse, small_config

    from tasks.training.base import resolve_base
    from tasks.training.merge import run_merge
    from tasks.training.sft import run_sft

    base_url = f"{s3_root}-models/stories260K"
    fsspec.filesystem("s3").put(f"{STORIES}/", base_url.removeprefix("s3://") + "/", recursive=True)
    _other_machine(monkeypatch, tmp_path, "trainer")
    data = make_warehouse(tmp_path / "warehouse.duckdb",
                          sft={"train": alpaca_examples(64), "validation": alpaca_examples(16, offset=64)})
    cfg = small_config(s3_root, **{"model.base": base_url, "sft.max_steps": 4, "sft.eval_steps": 2,
                                   "sft.save_steps": 2, "sft.logging_steps": 1})
    base = resolve_base(cfg, data)
    assert base.path == base_url
    sft = run_sft(cfg, base, data)
    assert sft.adapter.startswith(f"{s3_root}/models/sft/") and storage.is_published(sft.out_dir)

    _other_machine(monkeypatch, tmp_path, "merger")  # nothing local: base and adapter come from the bucket
    merged = run_merge(cfg, sft)
    assert merged.path.startswith(f"{s3_root}/models/merged/")
    assert merged.stats["max_abs_logit_diff"] <= merged.stats["parity_atol"]
    assert (tmp_path / "merger" / "s3" / base_url.removeprefix("s3://") / "config.json").is_file()
