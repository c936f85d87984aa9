"""DPO: trl's DPOTrainer on the warehouse's preference pairs, continuing the SFT adapter.

What is DPO's own; the shared path is tasks/training/trainer.py.

- Policy: base (4-bit when model.quantization=4bit) + the SFT adapter, trainable. Reference: the SFT model itself.
  trl keeps it as a frozen copy of the adapter next to the trained one (peft multi-adapter), so the base weights
  exist once; with dpo.precompute_ref_log_probs it is only used to compute the reference log-probs, once.
- Reference log-probs are cached on this machine's disk (cfg.cache_dir: <storage_root>/cache/ref_logps for a local
  root, the work dir for a remote one), keyed by the SFT result, the quantisation settings and the tokenized pairs
  (not beta, loss type or learning rate): a rerun with a new beta reads them instead of recomputing.
- Reward accuracy and margins are evaluated on the validation split (and on a fixed sample of training pairs) at
  start, every eval_steps and at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from tasks.core.config import PipelineConfig
from tasks.core.hashing import json_fingerprint
from tasks.core.results import DataResult, ModelResult
from tasks.training.distributed import fsdp_enabled
from tasks.training.loading import compute_dtype, use_cuda
from tasks.training.trainer import (
    AdapterMethod,
    TrainingJob,
    adapter_stage_task,
    chat_dataset,
    continued_adapter,
    finish_trainer,
    launched_main,
    preference_eval_sets,
    reward_stats,
    run_adapter_stage,
    trainer_arguments,
)

log = logging.getLogger("sftpipe.dpo")


def preference_dataset(pairs: list[dict]):
    """Conversational preference rows as trl expects them: prompt turns (tool calls and results included) and the
    row's tools, chosen / rejected assistant turns."""
    return chat_dataset(pairs, ("chosen", "rejected"))


def _dpo_trainer_class():
    import torch
    import trl
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    class CachedRefDPOTrainer(trl.DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist on disk across runs."""

        def __init__(self, *args, ref_cache_dir: Path | None = None, ref_cache_salt: str = "", **kwargs):
            self.ref_cache_dir, self.ref_cache_salt = ref_cache_dir, ref_cache_salt
            self.ref_logps_computed = 0
            self.ref_logps_cache_hits = 0
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            ids = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
            key = hashlib.sha256(json.dumps([self.ref_cache_salt, ids]).encode()).hexdigest()[:24]
            path = Path(self.ref_cache_dir) / f"{key}.safetensors" if self.ref_cache_dir else None
            if path is not None and path.exists():
                logps = load_file(str(path))
                self.ref_logps_cache_hits += 1
                log.info("reference log-probs for %s (%d pairs) read from %s", name, len(dataset), path)
            else:
                logps = self._reference_logps(dataset, batch_size)
                self.ref_logps_computed += 1
                if path is not None and self.accelerator.is_main_process:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_file(logps, str(path.with_suffix(".tmp")))
                    path.with_suffix(".tmp").rename(path)
                self.accelerator.wait_for_everyone()
            return (dataset.add_column("ref_chosen_logps", logps["chosen"].tolist())
                    .add_column("ref_rejected_logps", logps["rejected"].tolist()))

        def _reference_logps(self, dataset, batch_size) -> dict[str, torch.Tensor]:
            # trl's own precompute round-trips through a datasets cache file whose name is random per process for
            # in-memory datasets, so rank 1 cannot find rank 0's file; this keeps the tensors in memory instead.
            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         collate_fn=self.data_collator))
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(self.ref_model or self.model,
                                                                                     batch))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
            return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    return CachedRefDPOTrainer


def build_trainer(cfg: PipelineConfig, job: TrainingJob, callbacks=()):
    """A ready DPO trainer: the SFT adapter (trainable) on the base, validation and train-probe eval sets."""
    import trl

    d = cfg.dpo
    if not job.train:
        raise ValueError("DPO needs preference pairs: the training split of preference_pairs is empty")
    if fsdp_enabled(d) and d.precompute_ref_log_probs and use_cuda(cfg):
        raise ValueError("dpo.precompute_ref_log_probs computes the reference log-probs before FSDP has sharded the "
                         "model onto the GPUs (it is still in host memory then); with distributed=fsdp on GPUs set "
                         "dpo.precompute_ref_log_probs=false (the reference adapter is then applied on the fly)")
    model, tokenizer, exact = continued_adapter(cfg, d, job)
    evals = preference_eval_sets(d, job, preference_dataset)
    args = trainer_arguments(trl.DPOConfig, cfg, d, job.out_dir, has_eval=bool(evals), beta=d.beta,
                             loss_type=[d.loss_type], precompute_ref_log_probs=d.precompute_ref_log_probs)
    trainer = _dpo_trainer_class()(
        model=model, args=args, train_dataset=preference_dataset(job.train), eval_dataset=evals,
        processing_class=tokenizer, callbacks=list(callbacks),
        ref_cache_dir=cfg.cache_dir("ref_logps") if d.precompute_ref_log_probs else None,
        ref_cache_salt=job.extra.get("ref_cache_salt", ""),
    )
    return finish_trainer(cfg, trainer, exact)


def _stats(cfg: PipelineConfig, trainer, job: TrainingJob, curves: list[dict]) -> dict:
    return {"train_pairs": len(job.train), "eval_pairs": len((trainer.eval_dataset or {}).get("validation", [])),
            "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type, **reward_stats(curves),
            "ref_logps_computed": trainer.ref_logps_computed, "ref_logps_cache_hits": trainer.ref_logps_cache_hits}


def _read_pairs(warehouse: str, split: str) -> list[dict]:
    from tasks.core.warehouse import open_warehouse, preference_pairs

    with open_warehouse(warehouse, read_only=True) as con:
        return preference_pairs(con, split)


def ref_cache_salt(cfg: PipelineConfig, sft: ModelResult) -> str:
    """What the reference log-probs depend on besides the tokenized pairs: the SFT model and how it is loaded."""
    m = cfg.model
    return json_fingerprint({"sft": sft.fingerprint, "quantization": [m.quantization, m.bnb_4bit_quant_type,
                             m.bnb_4bit_use_double_quant, str(compute_dtype(cfg))], "attn": m.attn_implementation})


DPO = AdapterMethod(name="dpo", title="DPO", module="tasks.training.dpo", read_rows=_read_pairs,
                    build=build_trainer, stats=_stats,
                    job_extra=lambda cfg, sft: {"ref_cache_salt": ref_cache_salt(cfg, sft)})


def run_dpo(cfg: PipelineConfig, sft: ModelResult, data: DataResult) -> ModelResult:
    """The DPO stage: continue the SFT adapter on data's training preference pairs."""
    return run_adapter_stage(DPO, cfg, sft, data)


dpo_task = adapter_stage_task(DPO, run_dpo)

if __name__ == "__main__":
    launched_main(DPO)
