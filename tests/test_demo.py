"""The README's first command, `sftpipe demo`, end to end on a local storage root (the service test runs the same DAG
on an s3:// root through workers): every stage runs, the run ends Promoted, and a second run is served from cache."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, query

from tasks.core import storage
from tasks.core.config import load_config

pytestmark = pytest.mark.slow
FAST = ["sft.max_steps=30", "dpo.max_steps=10", "eval.max_examples=8", "eval.max_new_tokens=12",
        "promote.max_perplexity_rise=1.0", "promote.max_rouge_l_drop=1.0"]


def _demo(root: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "demo", f"storage_root={root}", *FAST],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _full_log(out: subprocess.CompletedProcess) -> str:
    path = next(line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("full log"))
    return Path(path).read_text()


def test_demo_runs_every_stage_on_a_local_root_then_comes_from_cache(tmp_path):
    root = tmp_path / "runs"
    first = _demo(root)
    assert "flow run finished: Promoted" in first.stdout
    # one screen: a line per stage, the eval table, the decision and where things are; the rest is in the full log
    assert len((first.stdout + first.stderr).splitlines()) <= 40, first.stdout + first.stderr
    assert re.search(r"^merged\s+\d", first.stdout, flags=re.M) and "Promoted merged" in first.stdout
    log = _full_log(first)
    for stage in ("ingest", "clean", "dedup", "split", "base", "sft", "dpo", "merge", "evaluate", "serve", "promote"):
        assert re.search(rf"^\s+{stage}\s+ran\s", first.stdout, flags=re.M), stage
        assert re.search(rf"Task run '{stage}-\w+' - Finished in state Completed", log), stage

    cfg = load_config(None, [f"storage_root={root}"])
    (run_id, model_path), = query(cfg, "SELECT run_id, model_path FROM current_model")
    assert storage.is_published(str(Path(model_path).parent)) and (Path(model_path) / "config.json").is_file()
    results = json.loads((root / "pipeline-runs" / run_id / "promote.json").read_text())
    assert results["decision"] == "promoted"

    again = _demo(root)
    assert "flow run finished: Promoted" in again.stdout
    log = _full_log(again)
    assert all(re.search(rf"^\s+{stage}\s+cached\s", again.stdout, flags=re.M) for stage in ("sft", "serve"))
    assert not re.search(r"Task run '(ingest|sft|dpo|merge|evaluate|serve)-\w+' - Finished in state Completed", log)
    assert len(re.findall(r"Finished in state Cached", log)) >= 12
