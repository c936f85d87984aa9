"""The README's first command, `sftpipe demo`, end to end on a local storage root (the service test runs the same DAG
on an s3:// root through workers), with the demo's defaults and the default promotion gate: every stage runs, the
model measurably learns (SFT and DPO against the pretrained-only base, on held-out rows, seeded), the run ends
Promoted, a second run is served from cache, and a run whose DPO learning rate wrecks the model ends
PromotionRejected with reasons that name the metric, its interval and the threshold, while the earlier model keeps
serving."""

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
DESTRUCTIVE = ["dpo.learning_rate=2e-3"]  # 20x the default: DPO pushes every answer's likelihood down


def _demo(root: Path, *overrides: str, succeeds: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "demo", f"storage_root={root}", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert (out.returncode == 0) == succeeds, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _summary(cfg, run_id: str) -> dict[str, dict]:
    cols = ["variant", "ppl_validation", "ppl_validation_low", "ppl_validation_high", "ppl_test", "rougeL",
            "rougeL_low", "rougeL_high", "preference_accuracy", "preference_accuracy_low", "preference_accuracy_high",
            "preference_pairs", "generated_examples"]
    rows = query(cfg, f"SELECT {', '.join(cols)} FROM eval_summary WHERE run_id = ?", [run_id])
    return {r[0]: dict(zip(cols, r)) for r in rows}


def _full_log(out: subprocess.CompletedProcess) -> str:
    path = next(line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("full log"))
    return Path(path).read_text()


def test_demo_learns_is_promoted_comes_from_cache_and_rejects_a_damaged_run(tmp_path):
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
    assert results["decision"] == "promoted" and results["reasons"] == []
    assert query(cfg, "SELECT count(*) FROM contaminated_examples")[0][0] == 0

    # What fine-tuning is for, on the held-out splits: SFT learns the task, DPO the preferred phrasing.
    ev = _summary(cfg, run_id)
    base, sft, dpo, merged = ev["base"], ev["sft"], ev["dpo"], ev["merged"]
    assert sft["ppl_validation"] <= 0.5 * base["ppl_validation"], ev
    assert sft["rougeL"] >= base["rougeL"] + 0.20, ev
    assert dpo["preference_accuracy"] >= 0.80 and dpo["preference_accuracy"] > sft["preference_accuracy"], ev
    assert merged["ppl_validation"] == pytest.approx(dpo["ppl_validation"], rel=1e-3)
    assert merged["preference_accuracy"] == dpo["preference_accuracy"] and merged["rougeL"] == dpo["rougeL"]
    for row in ev.values():  # every figure with its interval and its n
        for metric in ("ppl_validation", "rougeL", "preference_accuracy"):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"], (row["variant"], metric)
        assert row["preference_pairs"] >= 10 and row["generated_examples"] >= 20
    gate = {c["check"]: c for c in results["checks"]}
    assert gate["ROUGE-L (test)"]["rule"] == "interval" and gate["ROUGE-L (test)"]["delta_low"] > 0

    again = _demo(root)
    assert "flow run finished: Promoted" in again.stdout
    log = _full_log(again)
    assert all(re.search(rf"^\s+{stage}\s+cached\s", again.stdout, flags=re.M) for stage in ("sft", "serve"))
    assert not re.search(r"Task run '(ingest|sft|dpo|merge|evaluate|serve)-\w+' - Finished in state Completed", log)
    assert len(re.findall(r"Finished in state Cached", log)) >= 12

    # A damaged candidate after the promoted run: rejected by the default gate, the promoted model keeps serving.
    damaged = _demo(root, *DESTRUCTIVE, succeeds=False)
    assert "flow run finished: PromotionRejected" in damaged.stdout
    (rejected_run, reasons), = query(cfg, "SELECT run_id, reasons FROM promotions WHERE decision = 'rejected'")
    assert any(r.startswith("perplexity (test) rose from") and "95% interval [" in r and "n=" in r
               and "allowed a rise of 0.0%" in r for r in reasons), reasons
    assert query(cfg, "SELECT run_id FROM current_model") == [(run_id,)]
    report = (root / "reports" / f"eval-{rejected_run}.md").read_text()
    assert f"Baseline: variant `merged` of run `{run_id}`" in report and "paired" in report
