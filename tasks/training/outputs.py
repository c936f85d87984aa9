"""Where a training stage writes: one folder per input key under <storage_root>/models, published once complete."""

from __future__ import annotations

from pathlib import Path

from tasks.core import storage
from tasks.core.config import PipelineConfig
from tasks.core.results import ModelResult, load_result


class StageOutput:
    """A training stage's output folder: named by its URL under the storage root, written in this machine's local
    copy of it, published (uploaded when the root is remote) once complete. Published folders are never rewritten,
    so a finished stage's result is read back instead of training again."""

    def __init__(self, cfg: PipelineConfig, kind: str, key: str):
        self.url = cfg.url("models", kind, key)
        self.dir = storage.local_path(self.url)

    def finished(self) -> ModelResult | None:
        if not storage.is_published(self.url):
            return None
        return load_result(storage.read_text(storage.join(self.url, "result.json")))

    def url_of(self, local: str | Path) -> str:
        """The URL a file or folder written under self.dir will have."""
        return storage.join(self.url, Path(local).resolve().relative_to(self.dir.resolve()).as_posix())

    def finish(self, result: ModelResult) -> ModelResult:
        (self.dir / "result.json").write_text(result.to_json())
        storage.publish(self.url)
        return result

