"""Content hashes: the fingerprints that cache keys and stage results are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def json_fingerprint(value: Any) -> str:
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False))[:16]


def files_fingerprint(folder: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.jinja")) -> str:
    """Content hash of the files a stage wrote (weights, configs, tokenizer, template)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted({p for pat in patterns for p in folder.glob(pat)}):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]

