"""Training curves where ML engineers look: TensorBoard event files under the storage root, the same numbers as the
warehouse's training_curves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from training_fixtures import STORIES_BASE, alpaca_examples, make_warehouse, small_config

from tasks.core.warehouse import open_warehouse
from tasks.training.sft import run_sft
from tasks.training.tracking import read_curves, sparkline, summary_markdown, tracker_hint

pytestmark = pytest.mark.slow


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_sft_curves_go_to_tensorboard_under_the_storage_root(tmp_path):
    data = make_warehouse(tmp_path / "warehouse.duckdb",
                          sft={"train": alpaca_examples(96), "validation": alpaca_examples(16, offset=96)})
    cfg = small_config(tmp_path / "runs", **{"sft.max_steps": 10, "sft.eval_steps": 5, "sft.save_steps": 5})
    result = run_sft(cfg, STORIES_BASE, data)
    runs = list((tmp_path / "runs" / "tensorboard" / "sft").iterdir())
    assert [r.name for r in runs] == [result.out_dir.rsplit("/", 1)[1]]  # one folder per run, named by its key
    scalars = _scalars(runs[0])

    with open_warehouse(data.warehouse, read_only=True) as con:
        curves = {metric: con.execute("SELECT step, value FROM training_curves WHERE metric = ? ORDER BY step",
                                      [metric]).fetchall() for metric in ("loss", "eval_loss", "learning_rate")}
    for metric, tag in (("loss", "train/loss"), ("eval_loss", "eval/loss"), ("learning_rate", "train/learning_rate")):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in curves[metric]], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in curves[metric]], rel=1e-6), tag
    assert [s for s, _ in scalars["eval/loss"]] == [0, 5, 10]
    assert scalars["eval/loss"][-1][1] < scalars["eval/loss"][0][1]

    # the Prefect summary shows the same curves compactly
    md = summary_markdown("SFT", result, read_curves(Path(result.out_dir) / "metrics.jsonl"), tracker_hint(cfg))
    assert re.search(r"\| eval_loss \| `[▁▂▃▄▅▆▇█]{3}` \|", md) and "tensorboard --logdir" in md
    assert sparkline([3, 2, 1]) == "█▅▁" and len(sparkline(list(range(100)))) == 24

    off = small_config(tmp_path / "off", **{"sft.max_steps": 2, "tracking.tensorboard": False})
    run_sft(off, STORIES_BASE, data)
    assert not (tmp_path / "off" / "tensorboard").exists()
