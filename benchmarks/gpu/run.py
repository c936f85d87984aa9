"""GPU benchmark: QLoRA SFT tokens/s and peak GPU memory for 1B- and 8B-class Llamas, and vLLM serving throughput.

    .venv/bin/python -m benchmarks.gpu.run                 # on a CUDA machine; < 8 min on one H100/H200
    .venv/bin/python -m benchmarks.gpu.run --skip-8b --skip-serve
    .venv/bin/python -m benchmarks.gpu.run --skip-single-gpu --skip-serve     # only the FSDP rows

No download: each model is a LlamaConfig with Llama-3.2-1B / Llama-3.1-8B dimensions (128,256-token vocabulary)
and random weights, saved once as bf16 safetensors, then trained by our SFT stage exactly as the pipeline runs it
(tasks.training.sft.build_trainer: 4-bit NF4 base + double quantisation, LoRA r=16 on all linear layers, bf16 compute,
assistant-only loss), without and with gradient checkpointing. The tokenizer is a word-level one built here with
`tokenizers` whose vocabulary is exactly the model's, so every id the random model emits decodes to text.
Conversations are random words, long enough that every example fills max_length (no padding: tokens/s is real tokens).

FSDP: the same QLoRA SFT with sft.distributed=fsdp over every visible GPU (torchrun, one process per GPU, activation
checkpointing on, benchmarks/gpu/fsdp.py): tokens/s over all GPUs, peak memory and share of the base per GPU. On a
one-GPU machine that is a single shard (the code path, not the scaling).

Clock: from the end of the warm-up steps to the end of training (trl's non-padding `num_tokens` over that span).
Peak memory: torch.cuda.max_memory_allocated from just before training (the 4-bit base already resident) to its end.
Serving: the 1B adapter (trained with gradient checkpointing) is merged into the bf16 base with peft, saved, and
served by .venv-serve's vLLM (`vllm serve`, OpenAI server on 127.0.0.1, via tasks.evaluation.serve); CONCURRENCY parallel
/v1/completions requests with a fixed output length (ignore_eos) give output tokens/s.

Writes benchmarks/results/gpu.{json,md} with the card's name and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import OUT, machine, write_results

WORK = OUT / "gpu"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLE_WORDS = ["system", "user", "assistant"]
# Llama-3.2-1B and Llama-3.1-8B shapes; max_position_embeddings kept small (only max_length is used).
MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# --cpu-smoke: the same code path on tiny shapes on CPU, to check the script where there is no GPU.
SMOKE_MODELS = {
    "tiny-a": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True),
}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------------------ inputs
def word_tokenizer(vocab_size: int, max_length: int):
    """A word-level fast tokenizer with exactly vocab_size ids: special tokens, role words, then w<i>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tasks.training.loading import DEFAULT_CHAT_TEMPLATE

    fixed = SPECIAL + ROLE_WORDS
    vocab = {tok: i for i, tok in enumerate(fixed)}
    vocab.update({f"w{i}": i for i in range(len(fixed), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=max_length)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def random_conversations(n: int, vocab_size: int, prompt_words: int, answer_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    first = len(SPECIAL) + len(ROLE_WORDS)
    words = lambda k: " ".join(f"w{rng.randrange(first, vocab_size)}" for _ in range(k))  # noqa: E731
    return [{"messages": [{"role": "user", "content": words(prompt_words)},
                          {"role": "assistant", "content": words(answer_words)}]} for _ in range(n)]


def build_random_llama(name: str, shape: dict, tokenizer, out_dir: Path, device: str) -> dict:
    """Random-weight Llama of this shape, saved as bf16 safetensors with the tokenizer (weights made on the device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    config = LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="4GB")
    tokenizer.save_pretrained(out_dir)
    del model
    _free()
    return {"name": name, "path": str(out_dir), "parameters": params, "build_s": round(time.time() - started, 1)}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ training
def _timer(warmup_steps: int):
    from transformers import TrainerCallback

    class SteadyTimer(TrainerCallback):
        """Tokens and time from the log after the warm-up steps to the last log (trl logs num_tokens every step)."""

        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []  # (step, time, num_tokens)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append((state.global_step, time.perf_counter(), int(logs["num_tokens"])))

        def result(self) -> dict:
            steady = [m for m in self.marks if m[0] >= warmup_steps]
            if len(steady) < 2:
                raise RuntimeError(f"too few logged steps after warm-up: {self.marks}")
            (s0, t0, n0), (s1, t1, n1) = steady[0], steady[-1]
            return {"measured_steps": s1 - s0, "tokens": n1 - n0, "seconds": t1 - t0,
                    "tokens_per_s": (n1 - n0) / (t1 - t0), "tokens_per_step": (n1 - n0) / max(s1 - s0, 1)}

    return SteadyTimer()


def sft_config(a: argparse.Namespace, base: str, checkpointing: bool, device: str):
    from tasks.core.config import PipelineConfig

    return PipelineConfig.model_validate({
        "storage_root": str(WORK / "runs"),
        "model": {"base": base, "device": device, "max_length": a.max_length, "quantization": "4bit"},
        "sft": {"max_steps": a.warmup_steps + a.steps, "per_device_batch_size": a.batch_size, "logging_steps": 1,
                "save_steps": 100_000, "warmup_steps": 0, "gradient_checkpointing": checkpointing,
                "assistant_only_loss": True},
    })


def train_once(a: argparse.Namespace, model: dict, examples: list[dict], checkpointing: bool, device: str,
               adapter_dir: Path | None = None) -> dict:
    """One QLoRA SFT run with our stage's trainer; tokens/s after warm-up and peak GPU memory while training."""
    import torch

    from tasks.training.sft import build_trainer

    cfg = sft_config(a, model["path"], checkpointing, device)
    timer = _timer(a.warmup_steps)
    started = time.time()
    out_dir = WORK / "runs" / f"{model['name']}-gc{int(checkpointing)}"
    shutil.rmtree(out_dir, ignore_errors=True)
    trainer = build_trainer(cfg, model["path"], examples, [], out_dir, callbacks=[timer])
    load_s = time.time() - started
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if adapter_dir is not None:
        trainer.save_model(str(adapter_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = {"model": model["name"], "parameters": model["parameters"], "gradient_checkpointing": checkpointing,
           "batch_size": a.batch_size, "max_length": a.max_length, **timer.result(),
           "peak_gpu_gib": round(peak / 2**30, 2), "resident_before_train_gib": round(resident / 2**30, 2)
           if cuda else 0.0, "load_s": round(load_s, 1), "train_runtime_s": round(output.metrics["train_runtime"], 1),
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    del trainer
    _free()
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"  {row['model']:<9} gc={int(checkpointing)}: {row['tokens_per_s']:.0f} tok/s, peak "
          f"{row['peak_gpu_gib']} GiB (load {row['load_s']} s)", flush=True)
    return row


def fsdp_once(a: argparse.Namespace, model: dict, examples: list[dict], device: str, processes: int,
              deadline: Deadline) -> dict:
    """The same QLoRA SFT sharded over `processes` GPUs (benchmarks/gpu/fsdp.py); a failure is a row, not a crash."""
    from benchmarks.gpu.fsdp import run_fsdp

    tree = sft_config(a, model["path"], True, device).model_dump(mode="json")
    try:
        row = run_fsdp(tree, model, examples, WORK / "fsdp" / model["name"], processes, a.warmup_steps,
                       timeout_s=max(60.0, deadline.left()))
    except Exception as err:  # report it in the table; the log stays under WORK/fsdp
        row = {"model": model["name"], "processes": processes, "error": f"{type(err).__name__}: {str(err)[-1500:]}"}
        print(f"  {model['name']} fsdp x{processes}: FAILED {row['error'][-600:]}", flush=True)
        return row
    print(f"  {row['model']:<9} fsdp x{processes}: {row['tokens_per_s']:.0f} tok/s, peak "
          f"{row['peak_gpu_gib_per_process']} GiB per GPU, base share {row['base_share_per_process']}", flush=True)
    return row


# ------------------------------------------------------------------------------------------------------ serving
def merge_for_serving(model: dict, adapter_dir: Path, out_dir: Path, device: str) -> dict:
    """LoRA merged into the bf16 base (peft merge_and_unload), saved with the tokenizer and chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    base = AutoModelForCausalLM.from_pretrained(model["path"], dtype=torch.bfloat16, device_map={"": device})
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    shutil.rmtree(out_dir, ignore_errors=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out_dir)
    del base, merged
    _free()
    return {"path": str(out_dir), "merge_s": round(time.time() - started, 1)}


def serve_throughput(a: argparse.Namespace, merged_path: str, vocab_size: int, deadline: Deadline) -> dict:
    """Start vLLM on the merged model, send a.requests completions a.concurrency at a time; output tokens/s."""
    import httpx

    from tasks.core.config import PipelineConfig
    from tasks.evaluation.serve import (
        VLLMServer,
        free_port,
        serve_venv,
        server_command,
        server_env,
    )

    cfg = PipelineConfig.model_validate({"serve": {
        "dtype": "float32" if a.cpu_smoke else "bfloat16", "max_model_len": 2048,
        "extra_args": ["--gpu-memory-utilization", str(a.gpu_memory_utilization), "--max-num-seqs",
                       str(max(a.concurrency, 16))]}})
    if not (serve_venv(cfg) / "bin" / "python").exists():
        return {"skipped": f"no serving virtualenv at {serve_venv(cfg)} (run .ci/setup-serve on this machine)"}
    port = free_port()
    cmd = server_command(cfg, merged_path, port, "bench")
    prompts = [p["messages"][0]["content"] for p in random_conversations(a.requests, vocab_size, a.prompt_words, 0, 1)]
    log_path = WORK / "vllm.log"
    with VLLMServer(cmd, port, server_env(cfg), log_path) as server:
        startup_s = server.start(timeout_s=max(30.0, deadline.left() - 60))
        with httpx.Client(timeout=a.request_timeout, trust_env=False) as client:
            def complete(prompt: str) -> int:
                body = {"model": "bench", "prompt": prompt, "max_tokens": a.output_tokens, "temperature": 0.0,
                        "ignore_eos": True}
                r = client.post(f"{server.url}/v1/completions", json=body)
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

            complete(prompts[0])  # warm-up: first-request compilation and allocation are not throughput
            started = time.perf_counter()
            with ThreadPoolExecutor(a.concurrency) as pool:
                produced = list(pool.map(complete, prompts))
            wall = time.perf_counter() - started
    return {"command": " ".join(cmd), "dtype": cfg.serve.dtype, "startup_s": round(startup_s, 1), "requests": len(prompts),
            "concurrency": a.concurrency, "prompt_words": a.prompt_words, "output_tokens_per_request": a.output_tokens,
            "completion_tokens": sum(produced), "wall_s": round(wall, 2),
            "requests_per_s": round(len(prompts) / wall, 2), "output_tokens_per_s": round(sum(produced) / wall, 1),
            "log": str(log_path)}


# ------------------------------------------------------------------------------------------------------ report
def markdown(payload: dict) -> str:
    p = payload["params"]
    lines = [f"GPU: **{payload['gpu']['name']}** ({payload['gpu']['memory_gib']} GiB), CUDA "
             f"{payload['gpu']['cuda']}, torch {payload['versions'].get('torch')}, bitsandbytes "
             f"{payload['versions'].get('bitsandbytes')}. Random-weight Llama shapes, 4-bit NF4 QLoRA (r=16, all "
             f"linear), bf16 compute, batch {p['batch_size']} × {p['max_length']} tokens (no padding), "
             f"{p['steps']} measured steps after {p['warmup_steps']} warm-up steps."]
    if payload["training"]:
        lines += ["", "| model | parameters | gradient checkpointing | SFT tokens/s | peak GPU GiB | "
                  "4-bit base resident GiB |", "|---|---:|---|---:|---:|---:|"]
    for r in payload["training"]:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {'on' if r['gradient_checkpointing'] else 'off'}"
                     f" | {r['tokens_per_s']:.0f} | {r['peak_gpu_gib']} | {r['resident_before_train_gib']} |")
    if payload.get("fsdp"):
        lines += ["", "| model, fsdp | GPUs | SFT tokens/s (all GPUs) | tokens/s per GPU | peak GiB per GPU | "
                  "share of the base per GPU |", "|---|---:|---:|---:|---:|---:|"]
        for r in payload["fsdp"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['processes']} | failed: {r['error'][:200]} | | | |")
                continue
            lines.append(f"| {r['model']} | {r['processes']} | {r['tokens_per_s']:.0f} | "
                         f"{r['tokens_per_s_per_gpu']:.0f} | {', '.join(map(str, r['peak_gpu_gib_per_process']))} | "
                         f"{', '.join(f'{x:.2f}' for x in r['base_share_per_process'])} |")
    s = payload.get("serving") or {}
    lines.append("")
    if "output_tokens_per_s" in s:
        lines += ["| served model | requests | concurrency | output tokens/request | output tokens/s | requests/s | "
                  "server startup s |", "|---|---:|---:|---:|---:|---:|---:|",
                  f"| {s['model']} merged ({s['dtype']}, vLLM) | {s['requests']} | {s['concurrency']} | "
                  f"{s['output_tokens_per_request']} | {s['output_tokens_per_s']:.0f} | {s['requests_per_s']} | "
                  f"{s['startup_s']} |"]
    else:
        lines.append(f"vLLM serving: not measured ({s.get('skipped') or s.get('error') or 'skipped'}).")
    lines += [f"Skipped: {item}." for item in payload.get("skipped", [])]
    lines += ["", f"Total wall time {payload['total_wall_s']} s."]
    return "\n".join(lines) + "\n"


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu (smoke run)", "memory_gib": 0, "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(0))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps per configuration")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-single-gpu", action="store_true", help="no one-GPU training rows")
    ap.add_argument("--skip-fsdp", action="store_true", help="no FSDP rows")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting new phases past this (8 min limit)")
    ap.add_argument("--name", default="gpu")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke-serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not a.cpu_smoke:
        raise SystemExit("benchmarks.gpu.run needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}). Run it on a CUDA box with the CUDA torch build installed.")
    deadline = Deadline(a.budget_s)
    started = time.time()
    device = "cpu" if a.cpu_smoke else "cuda"
    shapes = SMOKE_MODELS if a.cpu_smoke else {k: v for k, v in MODELS.items() if not (a.skip_8b and k == "llama-8b")}
    if a.cpu_smoke and not a.smoke_serve:
        a.skip_serve = True
    WORK.mkdir(parents=True, exist_ok=True)
    answer_words = a.max_length  # one word = one token: every example overflows max_length, so none is padded
    training, built, serving, skipped, fsdp = [], {}, {}, [], []
    processes = 2 if a.cpu_smoke else torch.cuda.device_count()
    first_name = next(iter(shapes))
    try:
        for name, shape in shapes.items():
            needs = 200 if name == "llama-8b" else 60  # 8B: ~16 GB to write and to quantise twice
            if deadline.left() < needs:
                skipped.append(f"{name}: out of time budget ({deadline.left():.0f} s left of --budget-s)")
                print(f"skipping {name}: {deadline.left():.0f} s left of --budget-s", flush=True)
                continue
            tokenizer = word_tokenizer(shape["vocab_size"], a.max_length)
            examples = random_conversations(a.batch_size * (a.steps + a.warmup_steps) + 8, shape["vocab_size"],
                                            a.max_length // 8, answer_words)
            model = build_random_llama(name, shape, tokenizer, WORK / "models" / name, device)
            built[name] = model
            print(f"{name}: {model['parameters'] / 1e9:.2f} B parameters, built and saved in {model['build_s']} s",
                  flush=True)
            for checkpointing in (() if a.skip_single_gpu else (False, True)):
                keep = WORK / "adapter" if (name == first_name and checkpointing) else None
                training.append(train_once(a, model, examples, checkpointing, device, adapter_dir=keep))
            if not a.skip_fsdp:
                fsdp.append(fsdp_once(a, model, examples, device, processes, deadline))
            if name != first_name:
                shutil.rmtree(model["path"], ignore_errors=True)  # 16 GB of bf16 weights: not needed any more
        if a.skip_single_gpu and not a.skip_serve:
            serving = {"skipped": "--skip-single-gpu: no adapter from the one-GPU runs to serve"}
        elif a.skip_serve:
            serving = {"skipped": "--skip-serve" if not a.cpu_smoke else "cpu smoke run"}
            if a.cpu_smoke and not a.skip_single_gpu:  # still exercise the merge
                serving["merge_s"] = merge_for_serving(built[first_name], WORK / "adapter", WORK / "merged",
                                                       device)["merge_s"]
        elif deadline.left() < 120:
            serving = {"skipped": f"out of time budget ({deadline.left():.0f} s left of --budget-s)"}
        else:
            merged = merge_for_serving(built[first_name], WORK / "adapter", WORK / "merged", device)
            try:
                serving = {"model": first_name, "merge_s": merged["merge_s"],
                           **serve_throughput(a, merged["path"], shapes[first_name]["vocab_size"], deadline)}
            except Exception as err:  # report what was measured; the serving failure is in the table and the log
                serving = {"error": f"{type(err).__name__}: {str(err)[-800:]}"}
    finally:  # model weights are big and rebuilt on every run; vllm.log stays for reading
        for folder in ("models", "adapter", "merged", "runs"):
            shutil.rmtree(WORK / folder, ignore_errors=True)

    from tasks.training.loading import library_versions

    payload = {"benchmark": "gpu", "gpu": gpu_info(), "machine": machine(), "params": vars(a),
               "versions": library_versions(), "training": training, "fsdp": fsdp, "serving": serving,
               "skipped": skipped,
               "command": " ".join([".venv/bin/python -m benchmarks.gpu.run", *(argv or sys.argv[1:])]),
               "total_wall_s": round(time.time() - started, 1)}
    md = markdown(payload)
    name = a.name if not a.cpu_smoke else "gpu_cpu_smoke"
    if a.cpu_smoke:
        out = Path("/tmp") / name
        out.mkdir(exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
        where = out
    else:
        write_results(name, json.loads(json.dumps(payload, default=str)), md)
        where = "benchmarks/results"
    print()
    print(md)
    print(f"results in {where}/{name}.json and .md")


if __name__ == "__main__":
    main()
