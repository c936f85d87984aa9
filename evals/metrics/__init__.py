"""Local `evaluate` metric modules, loaded by path so nothing is fetched from the hub at run time."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def load_metric(name: str):
    """evaluate.load of evals/metrics/<name>/<name>.py, kept in memory (no cache files, no hub)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"), keep_in_memory=True)


def evals_code_hash() -> str:
    """Hash of every source file of the evals package: part of the eval stage's cache key."""
    h = hashlib.sha256()
    for path in sorted(METRICS_DIR.parent.rglob("*.py")):
        h.update(path.relative_to(METRICS_DIR.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
