"""Training progress: per-step metrics to metrics.jsonl, the log and Prefect progress; runs and curves to DuckDB."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from tasks.core import progress
from tasks.core.artifacts import in_prefect_run
from tasks.core.results import ModelResult
from tasks.training.loading import library_versions

log = logging.getLogger("sftpipe.train")


def distributed_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class TrainingReporter(TrainerCallback):
    """Every log/eval row of a run -> metrics.jsonl (loaded into DuckDB at the end), the log, and Prefect progress.

    Rows are (step, metric, value); tokens_per_s is derived between consecutive logs from trl's num_tokens (or the
    trainer's own token count). Appends, so a resumed run continues the file it was killed in. With tensorboard_dir,
    the same rows also go to TensorBoard event files there (a resumed run replaces the steps it redoes).
    """

    def __init__(self, stage: str, path: Path, total_steps: int | None = None, tensorboard_dir: Path | None = None):
        self.stage, self.path, self.total_steps = stage, Path(path), total_steps
        self.tensorboard_dir = tensorboard_dir
        self._writer = None
        self.rows: list[dict] = []
        self.tokens_per_s: float | None = None
        self._artifact = None
        self._last = None  # (time, tokens) at the previous training log
        self._train_started = None
        self._train_tokens = 0

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a killed attempt, past the checkpoint it resumes from)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_train_begin(self, args, state, control, **kwargs):
        self.total_steps = state.max_steps or self.total_steps
        self._train_started = time.time()
        self._last = (time.time(), None)
        if _is_main_process():
            progress.emit("advance", stage=self.stage, done=int(state.global_step), total=self.total_steps)
            if self.tensorboard_dir is not None and self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                if state.global_step == 0:  # a fresh start: event files of an earlier attempt would double its steps
                    shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
                self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=int(state.global_step) or None)
        if _is_main_process() and in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact = create_progress_artifact(
                    progress=100.0 * state.global_step / max(self.total_steps or 1, 1),
                    key=f"{self.stage}-progress", description=f"{self.stage} training progress")
            except Exception as err:
                log.warning("no progress artifact: %s", err)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not _is_main_process():
            return
        now = time.time()
        step = int(state.global_step)
        values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))
                  and k not in ("epoch", "total_flos")}
        values = _name_eval_dataset(values)
        tokens = values.get("num_tokens") or values.get("num_input_tokens_seen")
        if "loss" in values and tokens:
            last_t, last_tokens = self._last
            if last_tokens is not None and tokens > last_tokens and now > last_t:
                values["tokens_per_s"] = (tokens - last_tokens) / (now - last_t)
            self._last = (now, tokens)
            self._train_tokens = int(tokens)
        rows = [{"step": step, "epoch": float(state.epoch or 0), "metric": k, "value": v, "time": now}
                for k, v in values.items()]
        self.rows += rows
        if self._writer is not None:
            for r in rows:  # TensorBoard groups tags by their first "/" part: eval_ and train_ metrics apart
                self._writer.add_scalar(_tensorboard_tag(r["metric"]), r["value"], step, walltime=now)
            self._writer.flush()  # also the final evaluation, logged after training ends
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k in SHOWN_METRICS)
        log.info("%s step %d/%s %s", self.stage, step, self.total_steps, shown)
        if self._artifact is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact, progress=100.0 * step / max(self.total_steps or 1, 1))
            except Exception as err:
                log.warning("progress artifact update failed: %s", err)

    def on_step_end(self, args, state, control, **kwargs):
        if _is_main_process():
            progress.emit("advance", stage=self.stage, done=int(state.global_step), total=self.total_steps)

    def on_train_end(self, args, state, control, **kwargs):
        if self._train_started and self._train_tokens:
            self.tokens_per_s = round(self._train_tokens / max(time.time() - self._train_started, 1e-9), 1)


def _tensorboard_tag(metric: str) -> str:
    if metric.startswith("eval_"):
        return "eval/" + metric[len("eval_"):]
    return metric if "/" in metric else "train/" + metric


def tensorboard_dir(cfg, stage: str, run: str) -> Path | None:
    """Where a training run's event files go: this machine's copy of <storage_root>/tensorboard/<stage>/<run>
    (published with the stage's outputs for a remote root); None when cfg.tracking.tensorboard is off."""
    if not cfg.tracking.tensorboard:
        return None
    from tasks.core import storage

    return storage.local_path(cfg.url("tensorboard", stage, run))


def report_to(cfg) -> list[str]:
    """transformers' report_to for cfg.tracking.report_to; an integration that is not installed fails the stage at
    its start rather than after training."""
    from transformers.integrations import get_available_reporting_integrations

    missing = [name for name in cfg.tracking.report_to if name not in get_available_reporting_integrations()]
    if missing:
        raise ValueError(f"tracking.report_to names {missing}, not installed here; installed: "
                         f"{get_available_reporting_integrations()}")
    return list(cfg.tracking.report_to)


def publish_tensorboard(cfg, stage: str, run: str) -> None:
    from tasks.core import storage

    url = cfg.url("tensorboard", stage, run)
    if cfg.tracking.tensorboard and not storage.is_local(url) and storage.local_path(url).is_dir():
        storage.publish(url)


def _name_eval_dataset(values: dict[str, float]) -> dict[str, float]:
    """With several eval datasets, trl logs its own metrics as eval_<metric> for each; name the dataset in them."""
    named = [k[len("eval_"):-len("_loss")] for k in values if k.startswith("eval_") and k.endswith("_loss")
             and k != "eval_loss"]
    if len(named) != 1:
        return values
    prefix = f"eval_{named[0]}_"
    return {(prefix + k[len("eval_"):] if k.startswith("eval_") and not k.startswith(prefix) else k): v
            for k, v in values.items()}


SHOWN_METRICS = {"loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "rewards/accuracies",
                 "rewards/margins", "eval_validation_rewards/accuracies", "eval_validation_rewards/margins",
                 "eval_train_probe_rewards/accuracies", "eval_train_probe_rewards/margins"}


def read_curves(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_training_run(warehouse: str | Path | None, *, run_id: str, stage: str, fingerprint: str, base: str,
                        data_fingerprint: str, output_dir: str, stats: dict, config: dict,
                        curves_path: str | Path) -> None:
    """One short write transaction at the end of a stage: the run row and all its curve rows (idempotent)."""
    if not warehouse:
        return
    from tasks.core.warehouse import open_warehouse, utcnow

    # One point per (step, metric): the last one logged, so a resumed run's values replace what it redid and the
    # trainer's closing log does not repeat its last step's counters.
    rows = list({(r["step"], r["metric"]): r for r in read_curves(curves_path)}.values())
    with open_warehouse(warehouse) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM training_curves WHERE run_id = ?", [run_id])
        con.execute("DELETE FROM training_runs WHERE run_id = ?", [run_id])
        con.execute(
            "INSERT INTO training_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, stage, fingerprint, base, data_fingerprint, output_dir, utcnow(), stats.get("wall_s"),
             stats.get("tokens_per_s"), stats.get("resumed_from_step"), json.dumps(stats, default=str),
             json.dumps(config, default=str), json.dumps(stats.get("versions") or library_versions())],
        )
        if rows:
            con.executemany(
                "INSERT INTO training_curves VALUES (?, ?, ?, ?, ?, ?, to_timestamp(?))",
                [[run_id, stage, r["step"], r.get("epoch"), r["metric"], r["value"], r["time"]] for r in rows],
            )
        con.execute("COMMIT")



def metric_series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in rows if r["metric"] == name]


SPARK = "▁▂▃▄▅▆▇█"
CURVE_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "rewards/accuracies",
                 "rewards/margins", "eval_validation_rewards/accuracies", "eval_validation_rewards/margins",
                 "eval_rewards/accuracies", "eval_rewards/margins", "kl")


def sparkline(values: list[float], width: int = 24) -> str:
    """Values as unicode block characters, sampled evenly down to `width` points."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARK[min(int((v - low) / span * len(SPARK)), len(SPARK) - 1)] if span else SPARK[3]
                   for v in values)


def curves_markdown(rows: list[dict]) -> list[str]:
    """One line per metric: its curve as a sparkline, first / min / max / last value and where it was logged."""
    lines = ["| metric | curve | first | min | max | last | steps |", "|---|---|---|---|---|---|---|"]
    for metric in CURVE_METRICS:
        series = metric_series(rows, metric)
        if len(series) < 2:
            continue
        values = [v for _, v in series]
        lines.append(f"| {metric} | `{sparkline(values)}` | {values[0]:.4g} | {min(values):.4g} | "
                     f"{max(values):.4g} | {values[-1]:.4g} | {series[0][0]}–{series[-1][0]} ({len(series)}) |")
    return lines if len(lines) > 2 else []


def summary_markdown(title: str, result: ModelResult, curves: list[dict] | None = None, tracker: str | None = None) -> str:
    """A training stage's Prefect summary: its curves as sparklines (where it has any), then its stats.
    `tracker`: where the full curves are (a TensorBoard command, an MLflow run URL)."""
    s = result.stats
    keep = ["steps", "resumed_from_step", "train_examples", "eval_examples", "first_loss", "last_loss",
            "first_eval_loss", "last_eval_loss", "wall_s", "train_tokens", "tokens_per_s", "quantization",
            "packing", "world_size", "device", "ref_logps_computed", "ref_logps_cache_hits", "train_reward_accuracy",
            "probe_reward_accuracy", "probe_reward_margin", "eval_reward_accuracy", "eval_reward_margin",
            "max_abs_logit_diff", "parity_atol", "dtype"]
    lines = [f"## {title}", "", f"`{result.adapter or result.path}`", ""]
    if curve_lines := curves_markdown(curves or []):
        lines += [*curve_lines, ""]
    if tracker:
        lines += [f"Full curves: {tracker}", ""]
    lines += ["| stat | value |", "|---|---|"]
    lines += [f"| {k} | {s[k]} |" for k in keep if k in s]
    return "\n".join(lines)


def tracker_hint(cfg) -> str | None:
    if not cfg.tracking.tensorboard:
        return None
    return f"`tensorboard --logdir {cfg.url('tensorboard')}`"
