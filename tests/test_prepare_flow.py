"""The prepare-data flow against the session's real Prefect server: caching, per-stage invalidation, artifacts, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, query
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.prepare_data import prepare_data


def stage_states(flow_run_id) -> dict[str, set[str]]:
    """Stage name → the state names of its task runs in one flow run, read back through the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, set[str]] = {}
    for r in runs:  # task run names are "<stage>-<3 hex>"
        out.setdefault(r.name.rsplit("-", 1)[0], set()).add(r.state.name)
    return out


def test_rerun_is_served_from_cache_and_a_config_change_reruns_only_downstream(make_cfg):
    cfg = make_cfg()
    overrides = [f"storage_root={cfg.storage_root}"]

    first = prepare_data(overrides=overrides, return_state=True)
    assert first.is_completed()
    stats = first.result().stats
    assert stats["train"] > 0 and stats["validation"] > 0 and stats["test"] > 0
    states = stage_states(first.state_details.flow_run_id)
    assert states["ingest"] == states["clean"] == states["quality"] == states["dedup"] == states["split"] == {"Completed"}

    second = prepare_data(overrides=overrides, return_state=True)
    states = stage_states(second.state_details.flow_run_id)
    for stage in ("ingest", "clean", "quality", "minhash-shard", "dedup", "split"):
        assert states[stage] == {"Cached"}, (stage, states)

    third = prepare_data(overrides=overrides + ["data.dedup.threshold=0.7"], return_state=True)
    states = stage_states(third.state_details.flow_run_id)
    assert states["ingest"] == states["clean"] == states["quality"] == {"Cached"}
    assert states["dedup"] == {"Completed"}

    # A quality filter setting reruns the quality stage, not clean before it.
    states = stage_states(prepare_data(overrides=overrides + ["data.quality.languages=[en, zh]"],
                                       return_state=True).state_details.flow_run_id)
    assert states["clean"] == {"Cached"} and states["quality"] == {"Completed"}

    # Forcing one stage recomputes it even though nothing changed.
    fourth = prepare_data(overrides=overrides, refresh=["clean"], return_state=True)
    states = stage_states(fourth.state_details.flow_run_id)
    assert states["ingest"] == {"Cached"} and states["clean"] == {"Completed"}

    # A change to clean's output (more rows too short) reruns it and every stage downstream of it.
    fifth = prepare_data(overrides=overrides + ["data.clean.min_turn_chars=20"], return_state=True)
    states = stage_states(fifth.state_details.flow_run_id)
    assert states["ingest"] == {"Cached"}
    assert states["clean"] == states["quality"] == states["dedup"] == states["split"] == {"Completed"}, states

    # The data-quality report is an artifact of this run (not the latest on the shared server), read through the API.
    with get_client(sync_client=True) as client:
        art = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))
    keys = {a.key: a for a in art}
    assert "data-quality-report" in keys and "raw rows" in keys["data-quality-report"].data
    assert "data-quality-by-source" in keys


def test_cli_where_config_and_sql(tmp_path):
    env = {**os.environ}
    exe = Path(sys.executable).parent / "sftpipe"
    out = subprocess.run([exe, "where", f"storage_root={tmp_path}"], capture_output=True, text=True, env=env, check=True)
    assert str(tmp_path / "warehouse.duckdb") in out.stdout
    out = subprocess.run([exe, "config", "--describe"], capture_output=True, text=True, env=env, check=True)
    assert "data.dedup.threshold = 0.8" in out.stdout
    bad = subprocess.run([exe, "where", "data.dedup.threshold=2"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "data.dedup.threshold" in bad.stderr
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"storage_root: {tmp_path}/runs\ndata:\n  dedup:\n    threshold: 0.75\n")
    out = subprocess.run([exe, "config", "-c", cfg_file, "data.split.seed=7"], capture_output=True, text=True,
                         env=env, check=True)
    assert "threshold: 0.75" in out.stdout and "seed: 7" in out.stdout


def test_cli_runs_the_data_stages(tmp_path):
    exe = Path(sys.executable).parent / "sftpipe"
    root = tmp_path / "runs"
    run = subprocess.run([exe, "run", "--until", "split", f"storage_root={root}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    from tasks.core.config import load_config

    cfg = load_config(None, [f"storage_root={root}"])
    assert query(cfg, "SELECT count(*) FROM sft_examples")[0][0] > 100
    out = subprocess.run([exe, "sql", "select source, raw from quality_summary order by source", f"storage_root={root}"],
                         capture_output=True, text=True, check=True)
    assert "instructions_alpaca" in out.stdout


HOLD_THE_WAREHOUSE = """
import os, sys, time, duckdb
con = duckdb.connect(sys.argv[1])
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.1)
"""


def test_cli_sql_reads_only_the_warehouse_and_says_who_holds_it(tmp_path):
    from tasks.core.config import load_config
    from tasks.core.warehouse import open_warehouse

    root = tmp_path / "runs"
    cfg = load_config(None, [f"storage_root={root}"])
    with open_warehouse(cfg.warehouse_url):
        pass  # schema and views, no rows

    def sql(query: str):
        return subprocess.run([sys.executable, "-m", "flows.cli", "sql", query, f"storage_root={root}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    out = sql("select count(*) AS n from quality_summary")
    assert out.returncode == 0 and "0" in out.stdout, out.stderr
    target = tmp_path / "leak.csv"
    for query in (f"COPY (SELECT * FROM source_files) TO '{target}'", "SELECT * FROM read_csv('/etc/hostname')"):
        out = sql(query)
        assert out.returncode != 0 and "reads the warehouse only" in out.stderr, (query, out.stderr)
    assert not target.exists()

    # A writer holds the file: the query waits and says who holds it; it runs once the writer is done.
    held, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_WAREHOUSE, cfg.warehouse_url, str(held), str(release)])
    try:
        while not held.exists():
            assert holder.poll() is None
            time.sleep(0.1)
        query = subprocess.Popen([sys.executable, "-m", "flows.cli", "sql", "select count(*) AS n from raw_rows",
                                  f"storage_root={root}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        note = query.stderr.readline()
        assert f"(PID {holder.pid}) holds its lock" in note, note
    finally:
        release.touch()
        holder.wait(timeout=60)
    stdout, _ = query.communicate(timeout=120)
    assert query.returncode == 0 and "0" in stdout


def test_cli_gives_a_new_temporary_prefect_server_time_to_migrate(tmp_path):
    """Without PREFECT_API_URL a run starts a temporary server whose new database migrates first: Prefect's 20 s
    default wait is too short for that on a busy 2-core machine."""
    probe = ("from flows.cli import _setdefault_env; from tasks.core.config import load_config; "
             f"_setdefault_env(load_config(None, ['storage_root={tmp_path}'])); "
             "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as t; print(t.value())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) >= 120
