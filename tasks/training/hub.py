"""A base model given by Hugging Face hub id: resolved to a commit, downloaded once, checked before training.

The commit is the model's identity: the base stage's cache key and fingerprint include it, so a new upstream commit
retrains and an unchanged one stays cached. Files go to the usual Hugging Face cache (HF_HOME / HF_HUB_CACHE), so a
model downloaded once, here or by `hf download`, is not downloaded again. With HF_HUB_OFFLINE=1 the revision is
resolved from that cache. An unreachable hub fails in seconds, naming the model and the ways out.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from pathlib import Path

from tasks.core import progress, storage
from tasks.core.config import PipelineConfig

log = logging.getLogger("sftpipe.base")

# Weights as safetensors (or PyTorch .bin where a repo has no safetensors), config and tokenizer files; never other
# formats (GGUF, ONNX, TF/Flax) that transformers would not load here.
FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubUnavailable(RuntimeError):
    """The hub cannot be reached (or the model is not in the local cache while offline)."""


def is_hub_id(base: str) -> bool:
    """`org/name` or `name` that is not a local path, a URL or the embedded model."""
    if base == "embedded" or not storage.is_local(base) or base.startswith(("/", ".", "~")):
        return False
    return not Path(base).exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) is not None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _ways_out(repo_id: str, revision: str | None, err: object) -> str:
    from huggingface_hub import constants

    where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if _offline() else \
        f"on the hub at {constants.ENDPOINT}"
    return (f"model.base={repo_id} (revision {revision or 'main'}) cannot be found {where}: {err}\n"
            "Ways out: set model.base to a local folder that holds the model; set HF_ENDPOINT to a hub mirror you "
            f"can reach; or download it beforehand where there is network (`hf download {repo_id}`, into the same "
            "HF_HOME) and run with HF_HUB_OFFLINE=1 so the cached copy is used.")


@functools.lru_cache(maxsize=32)
def resolve_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit that `revision` (branch, tag or commit; None: the default branch) of repo_id points to now."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if revision and COMMIT.fullmatch(revision):
        return revision
    try:
        if _offline():
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)).name
        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ValueError(f"model.base={repo_id} revision {revision or 'main'} does not exist on the hub: "
                         f"{str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, timeout, not cached: all "unreachable"
        raise HubUnavailable(_ways_out(repo_id, revision, f"{type(err).__name__}: {err}")) from None


def cache_key(cfg: PipelineConfig) -> str | None:
    """The commit model.base resolves to (part of the base stage's cache key); None when it is no hub id.

    Unresolvable now: a key no earlier run has, so the stage runs and fails with the full message."""
    if not is_hub_id(cfg.model.base):
        return None
    try:
        return resolve_revision(cfg.model.base, cfg.model.revision)
    except (HubUnavailable, ValueError):
        return f"unresolved-{time.time_ns()}"


def _tqdm_to_progress(stage: str):
    """A tqdm class that reports the download's progress (files) to progress listeners as well."""
    from tqdm.auto import tqdm

    class Reported(tqdm):
        def update(self, n=1):
            out = super().update(n)
            progress.emit("advance", stage=stage, done=self.n, total=self.total)
            return out

    return Reported


def download(repo_id: str, commit: str, trust_remote_code: bool = False) -> Path:
    """The snapshot folder of repo_id at commit in the Hugging Face cache, downloaded if it is not there yet."""
    from huggingface_hub import HfApi, snapshot_download

    patterns = list(FILES) + (["*.py"] if trust_remote_code else [])
    try:
        if not _offline():
            names = [s.rfilename for s in HfApi().model_info(repo_id, revision=commit, timeout=10).siblings or []]
            if not any(n.endswith(".safetensors") for n in names):
                patterns.append("*.bin")
        started = time.time()
        path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns, etag_timeout=10,
                                      local_files_only=_offline(), tqdm_class=_tqdm_to_progress("base")))
    except Exception as err:  # noqa: BLE001
        raise HubUnavailable(_ways_out(repo_id, commit, f"{type(err).__name__}: {err}")) from None
    log.info("%s @ %s in %s (%.1f s)", repo_id, commit, path, time.time() - started)
    return path


def check_loads(path: Path, cfg: PipelineConfig) -> dict:
    """Config, tokenizer and every weight file open; returns what was found. Raises ValueError naming the problem."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError ...
        raise ValueError(f"the model files in {path} do not load: {type(err).__name__}: {err}") from None
    weights = sorted(path.glob("*.safetensors"))
    tensors = 0
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors += len(list(f.keys()))
        except Exception as err:  # noqa: BLE001 - truncated or corrupt file
            raise ValueError(f"weight file {file} does not open: {err}") from None
    if not weights and not list(path.glob("*.bin")):
        raise ValueError(f"no weight files (*.safetensors, *.bin) in {path}")
    return {"model_type": config.model_type, "vocab_size": len(tokenizer), "weight_files": len(weights) or
            len(list(path.glob("*.bin"))), "tensors": tensors,
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
