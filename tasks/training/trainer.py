"""The one adapter-training path every method (SFT, DPO, KTO) runs through.

A method says only what is its own (`AdapterMethod`): its config section, how it reads its rows from the warehouse,
how it builds its trl trainer, and the stats it adds. Everything else happens here once:

- `trainer_arguments`: the shared trainer settings (tasks.core.config.TrainerSettings) mapped onto trl's config class;
- `train_adapter`: one run in this process: resume from the last complete checkpoint, train, a final evaluation,
  save the adapter with its tokenizer and chat template, stats, clean up the checkpoints;
- `run_adapter_stage`: the stage around it: the output folder keyed by everything that determines the result (a
  finished one is read back, not retrained), launching several processes when configured, the `training_runs` row
  and curves, the summary artifact;
- `launched_main`: the entry point of every process accelerate / torchrun starts (`python -m tasks.training.sft
  --job <out_dir>/job.json`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core import storage
from tasks.core.artifacts import publish_markdown
from tasks.core.caching import retry_unless_deterministic, source_hash, stage_task
from tasks.core.config import PipelineConfig, PreferenceSettings, TrainerSettings
from tasks.core.hashing import files_fingerprint, json_fingerprint
from tasks.core.results import DataResult, ModelResult, Record
from tasks.core.storage import read_jsonl
from tasks.data.chat_template import chat_inputs
from tasks.training.distributed import (
    ParameterShareReport,
    allow_fsdp_on_cpu,
    distributed_arguments,
    distributed_mode,
    fsdp_enabled,
    needs_launcher,
    save_adapter_weights,
)
from tasks.training.launch import end_process_group, last_checkpoint, launched_job, train_in_processes
from tasks.training.loading import (
    compute_dtype,
    configure_threads,
    library_versions,
    load_model,
    load_tokenizer,
    snapshot_trainable_params,
    trainer_precision,
    training_code_hash,
    upcast_trainable_params,
    use_cuda,
)
from tasks.training.outputs import StageOutput
from tasks.training.tracking import (
    TrainingReporter,
    distributed_backend,
    metric_series,
    publish_tensorboard,
    read_curves,
    record_training_run,
    report_to,
    summary_markdown,
    tensorboard_dir,
    tracker_hint,
)

log = logging.getLogger("sftpipe.train")


@dataclass
class TrainingJob:
    """One training run's inputs, as a launched process reads them back from job.json."""

    out_dir: str
    base_path: str
    train: list[dict]
    validation: list[dict]
    adapter_path: str | None = None  # the adapter a preference method continues (None: SFT starts a new one)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific values (e.g. DPO's ref cache salt)


class TrainedAdapter(Record):
    """What one training run leaves (its train.json): the adapter folder, its checksum and the run's stats."""

    adapter: str
    adapter_sha: str
    stats: dict[str, Any]


@dataclass(frozen=True)
class AdapterMethod:
    """What one adapter-training method adds to the shared path.

    `build(cfg, job, callbacks)` returns a ready trl trainer; `stats(cfg, trainer, job, curves)` the method's own
    stats; `job_extra(cfg, upstream)` values the launched processes need besides the job's paths and rows."""

    name: str  # stage name, config section and models/<name>/ folder
    title: str
    module: str  # launched in every process when the settings need a launcher (num_processes > 1, fsdp)
    read_rows: Callable[[str, str], list[dict]]  # (warehouse, split) -> rows
    build: Callable[..., Any]
    stats: Callable[..., dict[str, Any]]
    job_extra: Callable[[PipelineConfig, ModelResult], dict[str, Any]] = lambda cfg, upstream: {}
    continues_adapter: bool = True  # train the upstream result's adapter further (False: a new adapter on a base)

    def settings(self, cfg: PipelineConfig) -> TrainerSettings:
        return getattr(cfg, self.name)


def trainer_arguments(trl_config_class, cfg: PipelineConfig, settings: TrainerSettings, out_dir: str | Path,
                      has_eval: bool, **method_arguments: Any):
    """trl's config for a method: the shared settings, the device's precision, how several processes share the
    model, and the method's own arguments."""
    s = settings
    arguments = dict(
        output_dir=str(Path(out_dir) / "checkpoints"),
        max_steps=s.max_steps, num_train_epochs=s.num_train_epochs,
        per_device_train_batch_size=s.per_device_batch_size, per_device_eval_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, gradient_checkpointing=s.gradient_checkpointing,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler_type, warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, logging_steps=s.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=s.eval_steps, eval_on_start=has_eval,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        max_length=cfg.model.max_length, seed=s.seed, data_seed=s.seed,
        report_to=report_to(cfg), disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        log_level="warning", **trainer_precision(cfg), **method_arguments,
    )
    return trl_config_class(**{**arguments, **distributed_arguments(cfg, s)})


def continued_adapter(cfg: PipelineConfig, settings: TrainerSettings, job: TrainingJob):
    """(model, tokenizer, exact trainable params) for a method that continues job.adapter_path: the adapter
    (trainable) on the base, with the adapter's own tokenizer (same pad token and chat template as SFT)."""
    from peft import PeftModel

    configure_threads()
    tokenizer = load_tokenizer(job.adapter_path, cfg)
    base = load_model(job.base_path, cfg, quantize=True, sharded=fsdp_enabled(settings))
    model = PeftModel.from_pretrained(base, job.adapter_path, is_trainable=True)
    return model, tokenizer, snapshot_trainable_params(model)


def chat_dataset(rows: list[dict], answers: tuple[str, ...], extra: dict[str, Any] | None = None):
    """Rows {prompt: canonical turns, tools, <answer>: text, ...} as the conversational dataset trl's preference
    trainers tokenise: the prompt and tools are chat_inputs' (what SFT, evaluation and serving render), each answer
    one assistant turn, tools as JSON text (trl passes a row's tools to apply_chat_template(tools=...)).
    extra: further columns, {name: datasets feature}, copied from the rows.

    Turns are stored as JSON values (datasets' Json), encoded here by orjson: a struct column would merge every row's
    keys (and tool-call argument keys) into one type full of NULLs that the template renders, and datasets' own
    encoder rounds floats to 10 digits."""
    import orjson
    from datasets import Dataset, Features, Json, List, Value

    def turns(messages: list[dict]) -> list[str]:
        return [orjson.dumps(m).decode() for m in messages]

    columns: dict[str, list] = {name: [] for name in ("prompt", "tools", *answers, *(extra or {}))}
    for row in rows:
        chat = chat_inputs(row["prompt"], row.get("tools"))
        columns["prompt"].append(turns(chat["conversation"]))
        columns["tools"].append(orjson.dumps(chat["tools"]).decode() if chat["tools"] else None)
        for name in answers:
            columns[name].append(turns([{"role": "assistant", "content": row[name]}]))
        for name in extra or {}:
            columns[name].append(row[name])
    features = Features({"prompt": List(Json()), "tools": Value("string"), **{a: List(Json()) for a in answers},
                         **(extra or {})})
    return Dataset.from_dict(columns, features=features)


def preference_eval_sets(settings: PreferenceSettings, job: TrainingJob, to_dataset: Callable) -> dict | None:
    """Validation rows, and a fixed sample of training rows scored at start and end (the same rows both times)."""
    evals = {}
    if job.validation:
        evals["validation"] = to_dataset(job.validation[: settings.max_eval_examples])
    if settings.train_probe_examples:
        evals["train_probe"] = to_dataset(job.train[: settings.train_probe_examples])
    return evals or None


def finish_trainer(cfg: PipelineConfig, trainer, exact_params=None):
    """Our reporter logs every row already; on CPU, undo trl's bf16 cast of the trainable adapter (slow there)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if not use_cuda(cfg):
        upcast_trainable_params(trainer.model, compute_dtype(cfg), exact_params)
    return trainer


def reward_stats(curves: list[dict]) -> dict[str, float | None]:
    """The reward metrics trl's preference trainers log: the last training value, and on the train probe and
    validation sets the first (step 0: policy == reference) and last."""
    stats = {}
    for metric, name in (("accuracies", "accuracy"), ("margins", "margin"), ("chosen", "chosen"),
                         ("rejected", "rejected")):
        stats[f"train_reward_{name}"] = first_and_last(curves, f"rewards/{metric}")[1]
        for evaluated, prefix in (("train_probe", "probe"), ("validation", "eval")):
            first, last = first_and_last(curves, f"eval_{evaluated}_rewards/{metric}")
            stats[f"{prefix}_reward_{name}_start"], stats[f"{prefix}_reward_{name}"] = first, last
    return stats


def first_and_last(rows: list[dict], metric: str) -> tuple[float | None, float | None]:
    series = metric_series(rows, metric)
    return (series[0][1], series[-1][1]) if series else (None, None)


def save_adapter(trainer, adapter_dir: Path) -> None:
    """Only the trained adapter ("default"; not a frozen reference copy trl may keep next to it), with the tokenizer
    and chat template training used, so serving formats prompts exactly as training did."""
    save_adapter_weights(trainer, adapter_dir, ["default"])
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(adapter_dir))


def train_adapter(method: AdapterMethod, cfg: PipelineConfig, job: TrainingJob,
                  callbacks=()) -> TrainedAdapter | None:
    """Train (or resume) one run in this process; writes adapter/, metrics.jsonl and train.json under job.out_dir.
    Returns what it trained on the main process, None on the others."""
    settings, out_dir = method.settings(cfg), Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    reporter = TrainingReporter(method.name, out_dir / "metrics.jsonl",
                                tensorboard_dir=tensorboard_dir(cfg, method.name, out_dir.name))
    shares = ParameterShareReport(out_dir / "parameter_shares")
    trainer = method.build(cfg, job, [reporter, shares, *callbacks])
    allow_fsdp_on_cpu(trainer)
    checkpoint, resumed_from = last_checkpoint(out_dir / "checkpoints")
    if checkpoint:
        log.info("resuming %s from %s (step %d)", method.name, checkpoint, resumed_from)
        if trainer.is_world_process_zero():
            reporter.truncate_after(resumed_from)
    elif trainer.is_world_process_zero():
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None and trainer.state.global_step % settings.eval_steps != 0:
        trainer.evaluate()  # the validation metrics at the final step
    adapter_dir = out_dir / "adapter"
    save_adapter(trainer, adapter_dir)
    if not trainer.is_world_process_zero():
        return None

    rows = read_curves(out_dir / "metrics.jsonl")
    first_loss, last_loss = first_and_last(rows, "loss")
    first_eval_loss, last_eval_loss = first_and_last(rows, "eval_loss")
    tokens = max([v for _, v in metric_series(rows, "num_tokens")] or [0])
    runtime = output.metrics.get("train_runtime") or (time.time() - started)
    stats = {
        "steps": trainer.state.global_step, "resumed_from_step": resumed_from,
        "first_loss": first_loss, "last_loss": last_loss,
        "first_eval_loss": first_eval_loss, "last_eval_loss": last_eval_loss,
        "train_runtime_s": round(runtime, 2), "wall_s": round(time.time() - started, 2), "train_tokens": int(tokens),
        "tokens_per_s": round(tokens / runtime, 1) if runtime and tokens else None,
        "quantization": cfg.model.quantization,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "world_size": trainer.args.world_size, "distributed_backend": distributed_backend(), "seed": settings.seed,
        "distributed": distributed_mode(trainer), "parameters_per_process": shares.read(),
        "device": str(trainer.args.device), "versions": library_versions(),
        **method.stats(cfg, trainer, job, rows),
    }
    run = TrainedAdapter(adapter=str(adapter_dir.resolve()), adapter_sha=files_fingerprint(adapter_dir), stats=stats)
    (out_dir / "train.json").write_text(run.to_json())
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # finished: the adapter is the artifact now
    return run


def stage_key(method: AdapterMethod, cfg: PipelineConfig, upstream: ModelResult, data: DataResult) -> str:
    """Where a run lives: a function of everything that determines its output (so reruns never clobber)."""
    return json_fingerprint({upstream.stage: upstream.fingerprint, "data": data.fingerprint,
                             "model": cfg.model.model_dump(), method.name: method.settings(cfg).model_dump(),
                             "code": [training_code_hash(), source_hash(method.build)]})


def run_adapter_stage(method: AdapterMethod, cfg: PipelineConfig, upstream: ModelResult,
                      data: DataResult) -> ModelResult:
    """The stage: train `method` on data's training split from `upstream` (the base model for SFT, the SFT result
    for the preference methods); returns where the adapter is, its fingerprint and stats."""
    settings = method.settings(cfg)
    key = stage_key(method, cfg, upstream, data)
    out = StageOutput(cfg, method.name, key)
    if (done := out.finished()) is not None:  # finished earlier with these exact inputs: nothing to train
        return done
    base_url = upstream.base if method.continues_adapter else upstream.path
    train = method.read_rows(data.warehouse, "train")[: settings.max_train_examples]
    job = TrainingJob(out_dir=str(out.dir), base_path=str(storage.fetched(base_url)), train=train,
                      validation=method.read_rows(data.warehouse, "validation"),
                      adapter_path=str(storage.fetched(upstream.adapter)) if method.continues_adapter else None,
                      extra=method.job_extra(cfg, upstream))
    out.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if needs_launcher(settings):
        run = TrainedAdapter.model_validate(train_in_processes(
            cfg, settings, method.module, out.dir, job.train, job.validation, base_path=job.base_path,
            adapter_path=job.adapter_path, extra=job.extra))
    else:
        run = train_adapter(method, cfg, job)
    stats = {**run.stats, "wall_s": round(time.time() - started, 2)}
    sample = out.dir / "validation_sample.jsonl"
    if not method.continues_adapter:  # the examples merge checks its parity on, kept with the first adapter
        sample.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in job.validation[:16]))
    result = ModelResult(
        stage=method.name,
        fingerprint=json_fingerprint({"adapter": run.adapter_sha, upstream.stage: upstream.fingerprint}),
        adapter=out.url_of(run.adapter), adapter_sha=run.adapter_sha, base=base_url,
        base_fingerprint=upstream.base_fingerprint if method.continues_adapter else upstream.fingerprint,
        upstream_fingerprint=upstream.fingerprint, out_dir=out.url, warehouse=data.warehouse,
        data_fingerprint=data.fingerprint,
        validation_sample=upstream.validation_sample if method.continues_adapter else out.url_of(sample),
        stats=stats,
    )
    record_training_run(data.warehouse, run_id=f"{method.name}-{key}", stage=method.name,
                        fingerprint=result.fingerprint, base=base_url, data_fingerprint=data.fingerprint,
                        output_dir=out.url, stats=stats,
                        config={"model": cfg.model.model_dump(), method.name: settings.model_dump()},
                        curves_path=out.dir / "metrics.jsonl")
    publish_tensorboard(cfg, method.name, out.dir.name)
    publish_markdown(f"{method.name}-summary", summary_markdown(method.title, result, read_curves(out.dir / "metrics.jsonl"),
                                                                tracker_hint(cfg)), f"{method.title} run summary")
    return out.finish(result)


def adapter_stage_task(method: AdapterMethod, run: Callable):
    """The cached Prefect task of a method's stage function `run` (defined in the method's own module, whose source
    is part of the cache key)."""

    def config_of(cfg: PipelineConfig) -> dict:
        return {"model": cfg.model.model_dump(), method.name: method.settings(cfg).model_dump(),
                "storage_root": cfg.storage_root, "code": training_code_hash()}

    return stage_task(method.name, config_of, retries=1, retry_condition_fn=retry_unless_deterministic)(run)


def launched_main(method: AdapterMethod, argv: list[str] | None = None) -> None:
    """Entry point of every process accelerate launch / torchrun starts for `method`."""
    job, cfg = launched_job(argv, f"{method.title} training process")
    try:
        train_adapter(method, cfg, TrainingJob(out_dir=job["out_dir"], base_path=job["base_path"],
                                               train=read_jsonl(job["train"]), validation=read_jsonl(job["validation"]),
                                               adapter_path=job.get("adapter_path"), extra=job.get("extra") or {}))
    finally:
        end_process_group()

