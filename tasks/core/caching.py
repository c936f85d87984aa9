"""Cache keys for pipeline stages.

Prefect 3's default cache policy includes the flow run id, so it only caches within one run. Every stage here is a
Prefect task whose key is built from what actually determines its output:

    stage name + hash of the stage's source file + the config the stage reads + fingerprints of its inputs

Stages return a small typed result (tasks.core.results) with a `fingerprint` of what they wrote; the next stage
receives that result as an argument, so a changed upstream output changes every downstream key. A stage's outputs live in the
warehouse or under the storage root, never only in the Prefect result, so the result stays tiny.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from tasks.core import progress, storage
from tasks.core.config import PipelineConfig
from tasks.core.results import StageResult


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def source_hash(fn: Callable) -> str:
    """Hash of the whole module that defines `fn`: editing the stage's code invalidates its cache."""
    return hashlib.sha256(Path(inspect.getsourcefile(fn)).read_bytes()).hexdigest()[:16]


def _fingerprint_of(value: Any) -> str | None:
    if isinstance(value, StageResult):
        return value.fingerprint
    if isinstance(value, (str, int, float, bool)) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        parts = [_fingerprint_of(v) for v in value]
        return None if None in parts else json.dumps(parts)
    if isinstance(value, dict):  # e.g. {"sft": <stage result>, "dpo": <stage result>}
        parts = {str(k): _fingerprint_of(v) for k, v in value.items()}
        return None if None in parts.values() else json.dumps(parts, sort_keys=True)
    return None


class StagePolicy(CachePolicy):
    """Key from: stage name, stage code, the config the stage reads, fingerprints of upstream results."""

    def __init__(self, stage: str, code: str, config_of: Callable[[PipelineConfig], Any]):
        super().__init__()
        self.stage, self.code, self.config_of = stage, code, config_of

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        parts = [self.stage, self.code]
        for name in sorted(inputs):
            value = inputs[name]
            if isinstance(value, PipelineConfig):
                relevant = self.config_of(value)
                parts.append(json.dumps(relevant, sort_keys=True, default=str))
            else:
                fp = _fingerprint_of(value)
                if fp is None:
                    return None  # an input we cannot fingerprint: do not cache rather than cache wrongly
                parts.append(f"{name}={fp}")
        return sha256_text(*parts)


def stage_task(stage: str, config_of: Callable[[PipelineConfig], Any], **task_options):
    """Wrap a plain stage function as a cached, persisted Prefect task.

    `config_of(cfg)` returns the JSON-able part of the config the stage depends on (e.g. the dedup section plus
    the warehouse path). Options such as `retries` pass through to `prefect.task`.
    """

    def wrap(fn: Callable) -> Any:
        policy = StagePolicy(stage, source_hash(fn), config_of)
        return task(name=stage, cache_policy=policy, persist_result=True, on_running=[_started],
                    on_completion=[_finished], on_failure=[_finished], **task_options)(fn)

    return wrap


def _started(task, task_run, state) -> None:
    progress.emit("stage_started", stage=task.name)


def _finished(task, task_run, state) -> None:
    """Tell progress listeners (the sftpipe terminal) how a stage ended: ran, cached or failed, and in how long."""
    started = task_run.start_time.timestamp() if task_run.start_time else time.time()
    fields: dict[str, Any] = {"stage": task.name, "seconds": max(time.time() - started, 0.0)}
    if state.is_completed():
        fields.update(state="cached" if state.name == "Cached" else "ran",
                      result=state.result(raise_on_failure=False))
    else:
        fields.update(state="failed", error=state.message or state.name)
    progress.emit("stage_finished", **fields)


def current_run_id() -> str:
    """The Prefect flow run id when called inside a flow run, else "local"."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else "local"


_saved_storage: dict[str, str] = {}


def result_storage(cfg: PipelineConfig):
    """Prefect's result storage for stage results: <storage_root>/prefect-results, so a cache hit recorded by one
    worker is a hit for every worker that reaches the storage root.

    A local root is a path; a remote one is a RemoteFileSystem (fsspec) block, which Prefect needs saved on the
    server: it is saved once per process under a name derived from the URL (remembered in `_saved_storage`)."""
    url = cfg.url("prefect-results")
    if storage.is_local(url):
        return Path(url)
    if url not in _saved_storage:
        from prefect.filesystems import RemoteFileSystem

        name = f"sftpipe-results-{sha256_text(url)[:12]}"
        RemoteFileSystem(basepath=url).save(name, overwrite=True)
        _saved_storage[url] = f"remote-file-system/{name}"
    return _saved_storage[url]


def for_config(prefect_task, cfg: PipelineConfig):
    """The stage task with its results (and so its cache) kept under cfg's storage root."""
    return prefect_task.with_options(result_storage=result_storage(cfg))


def retry_unless_deterministic(task, task_run, state) -> bool:
    """Prefect retry condition: retry crashes and kills (the retry resumes from the last checkpoint), but not errors
    that would only repeat (bad config, bad data, a degenerate loss mask)."""
    try:
        state.result()
    except (ValueError, TypeError, KeyError) as err:
        logging.getLogger("sftpipe").error("not retrying %s: %s", task.name, err)
        return False
    except Exception:
        return True
    return True

