"""Training overhead: our SFT stage (tasks.training.trainer.train_adapter with the SFT method, QLoRA 4-bit) vs a plain TRL script, same run, same machine.

    .venv/bin/python -m benchmarks.training.run                  # ~6 min on 2 shared cores
    .venv/bin/python -m benchmarks.training.run --steps 10 --repeats 1 --name training_smoke

Both sides train the same base (stories260K, and the embedded tiny Llama built by tasks.training.base.build_embedded_base
from Alpaca rows) on the same conversations with the same hyperparameters (steps, batch size, max_length, learning
rate and schedule, LoRA r/alpha/dropout/targets, assistant-only loss, seed, 4-bit NF4 + double quantisation, fp32
compute, one torch thread, use_cpu=True, bf16=False, checkpoint every save_steps, no evaluation). Every measurement is
a fresh process; ours and plain alternate. The clock runs from the trainer's on_train_begin to on_train_end (the
training loop, checkpoint saves included; imports, model loading and tokenisation excluded); tokens are trl's own
non-padding count (`num_tokens`, the attention-mask sum), identical on both sides by construction and checked.

"plain TRL" is what its docs show: SFTTrainer + peft LoraConfig + BitsAndBytesConfig. On a 4-bit model trl casts
the LoRA weights to bf16 (the QLoRA paper's recipe); our stage puts them back in the compute dtype on CPU
(tasks.training.loading.upcast_trainable_params). `plain_fp32` is the same script plus that one line, so the table also shows
our stage's own overhead with the dtype difference taken out (`--methods ours,plain,plain_fp32`). trl's SFTConfig
turns gradient checkpointing on by default; our stage's default is off, so the plain script sets it off too (left on,
the plain script measured ~1.3x slower on stories260K). Results: benchmarks/results/training.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    ROOT,
    fmt_spread,
    machine,
    run_measured,
    summary,
    write_results,
)

SHARED = ROOT.parent / "shared"
ALPACA = SHARED / "data" / "instruct_alpaca_en" / "alpaca_en_demo.json"
STORIES = SHARED / "models" / "stories260K"
WORK = OUT / "training"
METHODS = ["ours", "plain", "plain_fp32"]
LABELS = {
    "ours": "ours: `tasks.training.trainer.train_adapter` with `tasks.training.sft.SFT` (QLoRA)",
    "plain": "plain TRL script (SFTTrainer + peft + bnb 4-bit)",
    "plain_fp32": "plain TRL script + fp32 LoRA weights",
}


# ------------------------------------------------------------------------------------------------------ inputs
def conversations(n: int, offset: int = 0) -> list[dict]:
    """n Alpaca rows as {messages: [{role, content}]} (the form tasks.core.warehouse.sft_examples returns)."""
    from tasks.data.formats import alpaca

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[offset: offset + n]
    return [{"example_id": str(i), "source": "alpaca_en_demo", "messages": alpaca(r)[1]} for i, r in enumerate(rows)]


def bench_config(a: argparse.Namespace, base: str):
    from tasks.core.config import PipelineConfig

    return PipelineConfig.model_validate({
        "storage_root": str(WORK),
        "model": {"base": base, "device": "cpu", "max_length": a.max_length},
        "sft": {"max_steps": a.steps, "per_device_batch_size": a.batch_size, "learning_rate": a.lr,
                "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "logging_steps": a.logging_steps,
                "save_steps": a.save_steps},
    })


def embedded_base(a: argparse.Namespace) -> Path:
    """The pipeline's default base (model.base=embedded), built once from a.rows Alpaca rows and cached."""
    from tasks.training.base import build_embedded_base

    cfg = bench_config(a, "embedded")
    out = WORK / f"embedded_base_{a.rows}_{a.max_length}"
    return Path(build_embedded_base(cfg, conversations(a.rows), out).path)


# ------------------------------------------------------------------------------------------------------ workers
def _timer():
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        """Wall time of the training loop and trl's running non-padding token count (same hook on both sides)."""

        start = end = None
        tokens = 0
        lora_dtypes: list[str] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.tokens = max(self.tokens, int(logs["num_tokens"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    return TrainTimer()


def run_ours(a: argparse.Namespace, base: str, examples: list[dict], out_dir: Path, timer) -> dict:
    from tasks.training.sft import SFT
    from tasks.training.trainer import TrainingJob, train_adapter

    job = TrainingJob(out_dir=str(out_dir), base_path=base, train=examples, validation=[])
    run = train_adapter(SFT, bench_config(a, base), job, callbacks=[timer])
    return {"first_loss": run.stats["first_loss"], "last_loss": run.stats["last_loss"]}


def run_plain(a: argparse.Namespace, base: str, examples: list[dict], out_dir: Path, timer, fp32_lora: bool) -> dict:
    """A plain TRL QLoRA script, as trl's and peft's docs write it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from tasks.training.loading import DEFAULT_CHAT_TEMPLATE

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32)
    peft_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.05, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, max_length=a.max_length, assistant_only_loss=True,
        logging_steps=a.logging_steps, save_steps=a.save_steps, save_total_limit=2, seed=42, data_seed=42,
        use_cpu=True, bf16=False, report_to=[], disable_tqdm=True,
        # trl defaults to gradient checkpointing on (~1.3x slower here); our stage's default is off: match it.
        gradient_checkpointing=False,
    )
    dataset = Dataset.from_list([{"messages": ex["messages"]} for ex in examples])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    if fp32_lora:  # undo trl's bf16 cast of the adapters: bf16 matmuls are slow on most CPUs
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def worker(a: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    examples = conversations(a.rows)
    timer = _timer()
    out_dir = Path(tempfile.mkdtemp(prefix=f"sft-{a.worker}-", dir=WORK))
    try:
        if a.worker == "ours":
            extra = run_ours(a, a.base, examples, out_dir, timer)
        else:
            extra = run_plain(a, a.base, examples, out_dir, timer, fp32_lora=a.worker == "plain_fp32")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    train_s = timer.end - timer.start
    print(json.dumps({"method": a.worker, "tokens": timer.tokens, "train_s": train_s,
                      "tokens_per_s": timer.tokens / train_s, "threads": torch.get_num_threads(),
                      "lora_dtypes": timer.lora_dtypes, **extra}))


# ------------------------------------------------------------------------------------------------------ driver
def measure(a: argparse.Namespace, label: str, base: str, methods: list[str]) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(a.repeats):
        order = methods if rep % 2 == 0 else methods[::-1]  # alternate, so drift in machine load hits both sides
        for method in order:
            cmd = [sys.executable, "-m", "benchmarks.training.run", "--worker", method, "--base", base,
                   *_shared_flags(a)]
            result, wall, peak = run_measured(cmd, timeout=600)
            result.update(process_wall_s=wall, peak_rss_mib=peak / 2**20, repeat=rep)
            runs[method].append(result)
            print(f"  {label:<12} {method:<10} rep {rep}: {result['tokens']} tokens in {result['train_s']:.2f} s "
                  f"= {result['tokens_per_s']:.0f} tok/s (loss {result['first_loss']:.3f} -> "
                  f"{result['last_loss']:.3f}; process {wall:.1f} s)", flush=True)
    token_counts = {m: sorted({r["tokens"] for r in rs}) for m, rs in runs.items()}
    same_tokens = len({c for counts in token_counts.values() for c in counts}) == 1
    stats = {m: {"tokens_per_s": summary([r["tokens_per_s"] for r in rs]),
                 "train_s": summary([r["train_s"] for r in rs]),
                 "process_wall_s": summary([r["process_wall_s"] for r in rs]),
                 "peak_rss_mib": summary([r["peak_rss_mib"] for r in rs])} for m, rs in runs.items()}
    ratios = {}
    for m in methods:
        if m == "ours":
            continue
        paired = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(runs["ours"], runs[m])]
        ratios[m] = {"of_medians": stats["ours"]["tokens_per_s"]["median"] / stats[m]["tokens_per_s"]["median"],
                     "paired": summary(paired)}
    return {"model": label, "base": base, "runs": runs, "stats": stats, "ratio_ours_over": ratios,
            "tokens_per_run": token_counts, "same_tokens": same_tokens}


def _shared_flags(a: argparse.Namespace) -> list[str]:
    return ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
            "--lr", str(a.lr), "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--rows", str(a.rows),
            "--logging-steps", str(a.logging_steps), "--save-steps", str(a.save_steps)]


def markdown(payload: dict) -> str:
    p = payload["params"]
    lines = [
        f"Training overhead, {p['steps']} steps × batch {p['batch_size']}, max_length {p['max_length']}, LoRA "
        f"r={p['lora_r']} α={p['lora_alpha']} all-linear, 4-bit NF4 base, fp32 compute, 1 torch thread, CPU; "
        f"median (min–max) of {p['repeats']} fresh processes per method, alternating.",
        "",
        "| model | method | tokens/run | train tokens/s | loop s | process s | peak RSS MiB | ours ÷ this |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in payload["results"]:
        for m, s in res["stats"].items():
            ratio = res["ratio_ours_over"].get(m)
            ratio_txt = (f"**{ratio['of_medians']:.2f}×** (paired {fmt_spread(ratio['paired'])})" if ratio else "—")
            tokens = "/".join(str(t) for t in res["tokens_per_run"][m])
            lines.append(f"| {res['model']} | {LABELS[m]} | {tokens} | {fmt_spread(s['tokens_per_s'], 0)} | "
                         f"{fmt_spread(s['train_s'])} | {fmt_spread(s['process_wall_s'], 1)} | "
                         f"{s['peak_rss_mib']['median']:.0f} | {ratio_txt} |")
    lines += ["", f"Target: ours ≥ 0.95× plain TRL. Machine: {payload['machine']['cpu']}, "
              f"{payload['machine']['cores']} cores (shared; load average at start "
              f"{payload['machine']['load_avg_at_start']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--rows", type=int, default=300, help="Alpaca rows: SFT data and embedded-base training data")
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--save-steps", type=int, default=25, help="checkpoint cadence, the stage's default, both sides")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="stories260K,embedded")
    ap.add_argument("--methods", default="ours,plain", help=f"from {','.join(METHODS)}")
    ap.add_argument("--name", default="training")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.worker:
        return worker(a)

    started = time.time()
    mach = machine()
    methods = [m for m in a.methods.split(",") if m]
    if "ours" not in methods:
        raise SystemExit("--methods must include ours")
    results = []
    for label in a.models.split(","):
        if label == "stories260K":
            base = str(STORIES)
        elif label == "embedded":
            t = time.time()
            base = str(embedded_base(a))
            print(f"embedded base ready in {time.time() - t:.1f} s: {base}", flush=True)
        else:
            base = label
        results.append(measure(a, label, base, methods))
    params = {k: v for k, v in vars(a).items() if k not in ("worker", "base")}
    payload = {"benchmark": "training", "params": params, "machine": mach, "results": results,
               "command": " ".join([".venv/bin/python -m benchmarks.training.run", *(argv or sys.argv[1:])]),
               "total_wall_s": round(time.time() - started, 1)}
    from tasks.training.loading import library_versions

    payload["versions"] = library_versions()
    md = markdown(payload)
    js_path, md_path = write_results(a.name, payload, md)
    print()
    print(md)
    print(f"wrote {js_path} and {md_path} in {payload['total_wall_s']} s")


if __name__ == "__main__":
    main()
