"""A base model given by hub id: resolved to a commit, taken from the Hugging Face cache, checked; an unreachable hub
fails at once naming the model and the ways out. Offline: the hub is a cache laid out as the hub client writes it,
and an endpoint on a closed local port."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from conftest import STORIES, free_port

from tasks.training import hub
from tasks.training.base import _base_config, resolve_base

REPO = "sftpipe-test/stories260K"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding REPO at two commits, `main` pointing at A; HF_HUB_OFFLINE as the tests run."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--sftpipe-test--stories260K"
    for commit in (COMMIT_A, COMMIT_B):
        shutil.copytree(STORIES, repo / "snapshots" / commit)
        (repo / "snapshots" / commit).chmod(0o755)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.resolve_revision.cache_clear()
    yield repo
    hub.resolve_revision.cache_clear()


def test_hub_id_resolves_to_a_commit_that_keys_the_cache(hub_cache, make_cfg):
    cfg = make_cfg(f"model.base={REPO}")
    assert hub.is_hub_id(REPO) and not hub.is_hub_id(str(STORIES)) and not hub.is_hub_id("embedded")
    base = resolve_base(cfg)
    assert base.path == str(hub_cache / "snapshots" / COMMIT_A)
    assert base.stats["revision"] == COMMIT_A and base.stats["requested_revision"] == "main"
    assert base.stats["model_type"] == "llama" and base.stats["tensors"] > 0
    key_a = _base_config(cfg)

    (hub_cache / "refs" / "main").write_text(COMMIT_B)  # upstream moved on
    hub.resolve_revision.cache_clear()
    moved = resolve_base(cfg)
    assert moved.stats["revision"] == COMMIT_B and moved.fingerprint != base.fingerprint
    assert _base_config(cfg) != key_a  # so the base stage (and everything after it) runs again

    pinned = make_cfg(f"model.base={REPO}", f"model.revision={COMMIT_A}")
    assert resolve_base(pinned).fingerprint == base.fingerprint


def test_broken_weights_fail_the_base_stage(hub_cache, make_cfg):
    weights = hub_cache / "snapshots" / COMMIT_A / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors does not open"):
        resolve_base(make_cfg(f"model.base={REPO}"))


def test_model_missing_from_the_offline_cache_names_the_ways_out(hub_cache, make_cfg):
    with pytest.raises(hub.HubUnavailable) as err:
        resolve_base(make_cfg("model.base=sftpipe-test/not-downloaded"))
    message = str(err.value)
    assert "model.base=sftpipe-test/not-downloaded" in message and "local Hugging Face cache" in message
    assert "local folder" in message and "HF_ENDPOINT" in message and "hf download sftpipe-test/not-downloaded" in message


def test_unreachable_hub_fails_at_once_naming_the_model(monkeypatch, make_cfg):
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    hub.resolve_revision.cache_clear()
    cfg = make_cfg("model.base=Qwen/Qwen2.5-0.5B-Instruct")
    started = time.monotonic()
    with pytest.raises(hub.HubUnavailable) as err:
        resolve_base(cfg)
    print(f"\nunreachable hub: failed after {time.monotonic() - started:.2f} s")
    message = str(err.value)
    assert "model.base=Qwen/Qwen2.5-0.5B-Instruct" in message and endpoint in message
    assert "local folder" in message and "HF_ENDPOINT" in message and "HF_HUB_OFFLINE=1" in message
    assert _base_config(cfg)["hub_commit"].startswith("unresolved-")  # never a cache hit for an unresolved id
    hub.resolve_revision.cache_clear()


def test_cli_leaves_the_hub_reachable_for_user_models(monkeypatch, make_cfg):
    from flows import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cli._setdefault_env(make_cfg("model.base=Qwen/Qwen2.5-0.5B-Instruct"))
    assert "HF_HUB_OFFLINE" not in os.environ
    cli._setdefault_env(make_cfg())  # the embedded model: nothing to download, no hub lookups
    assert os.environ["HF_HUB_OFFLINE"] == "1"
