"""KTO: trl's KTOTrainer on answers labelled desirable or not (`feedback_examples`), continuing the SFT adapter.

Unlike DPO it needs no pairs: each row is one prompt, one answer and a label. The reference is the SFT model (trl
keeps a frozen copy of the adapter, as for DPO). Rewards of desirable and undesirable answers, and their margin, are
evaluated on the validation split and on a fixed sample of training rows at start, every eval_steps and at the end.
"""

from __future__ import annotations

from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, ModelResult
from tasks.training import trainer as shared
from tasks.training.trainer import AdapterMethod, TrainingJob


def feedback_dataset(rows: list[dict]):
    """Unpaired preference rows as trl expects them: prompt turns (tool calls and results included) and the row's
    tools, one assistant answer, its label."""
    from datasets import Value

    return shared.chat_dataset([{**r, "label": bool(r["label"])} for r in rows], ("completion",),
                               {"label": Value("bool")})


def build_trainer(cfg: PipelineConfig, job: TrainingJob, callbacks=()):
    import trl

    k = cfg.kto
    if not {r["label"] for r in job.train} >= {True, False}:
        raise ValueError("KTO needs desirable and undesirable answers in the training split of feedback_examples")
    model, tokenizer, exact = shared.continued_adapter(cfg, k, job)
    evals = shared.preference_eval_sets(k, job, feedback_dataset)
    args = shared.trainer_arguments(trl.KTOConfig, cfg, k, job.out_dir, has_eval=bool(evals), beta=k.beta,
                             desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=feedback_dataset(job.train), eval_dataset=evals,
                             processing_class=tokenizer, callbacks=list(callbacks))
    return shared.finish_trainer(cfg, trainer, exact)


def _read(warehouse: str, split: str) -> list[dict]:
    from tasks.core.warehouse import feedback_examples, open_warehouse

    with open_warehouse(warehouse, read_only=True) as con:
        return feedback_examples(con, split)


def _stats(cfg: PipelineConfig, trainer, job: TrainingJob, curves: list[dict]) -> dict:
    return {"train_examples": len(job.train), "desirable": sum(bool(r["label"]) for r in job.train),
            "beta": cfg.kto.beta, **shared.reward_stats(curves)}


KTO = AdapterMethod(name="kto", title="KTO", module="tasks.training.kto", read_rows=_read, build=build_trainer,
                    stats=_stats)


def run_kto(cfg: PipelineConfig, sft: ModelResult, data: DataResult) -> ModelResult:
    """The KTO stage: continue the SFT adapter on data's training split of labelled answers."""
    return shared.run_adapter_stage(KTO, cfg, sft, data)


kto_task = shared.adapter_stage_task(KTO, run_kto)

if __name__ == "__main__":
    shared.launched_main(KTO)
