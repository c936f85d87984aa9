"""FSDP phase of the GPU benchmark: QLoRA SFT sharded over every visible GPU, through the pipeline's own training path.

`run_fsdp` writes a job (config with sft.distributed=fsdp, the examples) and starts one process per GPU with torchrun;
each runs `python -m benchmarks.gpu.fsdp --job job.json`: tasks.training.trainer.train_adapter with the SFT method (the
stage's trainer, sharding, checkpointing off, adapter gathered and saved), and writes its own numbers to rank-<r>.json:
tokens/s over all processes after the warm-up steps, peak GPU memory of its own card, and how much of the model it
holds. On CPU (--cpu-smoke) two gloo processes run the same code on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_fsdp(cfg_tree: dict, model: dict, examples: list[dict], work: Path, processes: int, warmup_steps: int,
             timeout_s: float) -> dict:
    """Train once with sft.distributed=fsdp over `processes` processes; the per-process rows and a summary row."""
    from tasks.core.storage import write_jsonl

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_jsonl(work / "train.jsonl", examples)
    tree = json.loads(json.dumps(cfg_tree))
    tree["sft"].update({"distributed": "fsdp", "num_processes": processes, "launcher": "torchrun"})
    (work / "job.json").write_text(json.dumps({"config": tree, "base_path": model["path"],
                                               "train": str(work / "train.jsonl"), "warmup_steps": warmup_steps,
                                               "out_dir": str(work / "run")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "benchmarks.gpu.fsdp", "--job", str(work / "job.json")]
    started = time.time()
    with (work / "launch.log").open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((work / "launch.log").read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"FSDP run exited with {proc.returncode}:\n{tail}")
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("rank-*.json"))]
    first = ranks[0]
    return {"model": model["name"], "parameters": model["parameters"], "processes": processes,
            "gradient_checkpointing": tree["sft"]["gradient_checkpointing"],
            "tokens_per_s": first["tokens_per_s"], "tokens_per_s_per_gpu": first["tokens_per_s"] / processes,
            "peak_gpu_gib_per_process": [r["peak_gpu_gib"] for r in ranks],
            "base_share_per_process": [r["base_local"] / max(r["base_total"], 1) for r in ranks],
            "adapter_saved": first["adapter_saved"], "first_loss": first["first_loss"],
            "last_loss": first["last_loss"], "wall_s": round(time.time() - started, 1), "ranks": ranks}


def _peak_memory_probe():
    from transformers import TrainerCallback

    class PeakMemory(TrainerCallback):
        """Peak GPU memory from the start of training (the model already sharded onto the card) to its end."""

        peak_gib = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    return PeakMemory()


def main(argv: list[str] | None = None) -> None:
    """One benchmark process under torchrun."""
    import os

    from benchmarks.gpu.run import _timer
    from tasks.core.config import PipelineConfig
    from tasks.core.storage import read_jsonl
    from tasks.training.sft import SFT
    from tasks.training.trainer import TrainingJob, train_adapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", required=True)
    job = json.loads(Path(ap.parse_args(argv).job).read_text())
    cfg = PipelineConfig.model_validate(job["config"])
    timer, memory = _timer(job["warmup_steps"]), _peak_memory_probe()
    run = train_adapter(SFT, cfg, TrainingJob(out_dir=job["out_dir"], base_path=job["base_path"],
                                              train=read_jsonl(job["train"]), validation=[]), callbacks=[timer, memory])
    rank = int(os.environ.get("RANK", 0))
    shares = json.loads((Path(job["out_dir"]) / "parameter_shares" / f"rank-{rank}.json").read_text())
    stats = run.stats if run else {}  # the main process's
    row = {**shares, **timer.result(), "peak_gpu_gib": memory.peak_gib,
           "adapter_saved": rank != 0 or (Path(job["out_dir"]) / "adapter" / "adapter_model.safetensors").is_file(),
           "first_loss": stats.get("first_loss"), "last_loss": stats.get("last_loss")}
    (Path(job["out_dir"]).parent / f"rank-{rank}.json").write_text(json.dumps(row, default=str))


if __name__ == "__main__":
    main()
