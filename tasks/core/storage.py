"""The storage root: a local folder or any fsspec URL (s3://, gs://, az://, ...), through one code path.

Stages compute on local files (DuckDB, transformers and vLLM all need them) and move them with two calls:

    fetch(url)    the local copy of url: the path itself when url is local, else downloaded once into the work dir
    publish(url)  upload the local copy of url to url: nothing to do when url is local

so a stage never asks where the root is; only this module knows. Every place is named by its URL (for a local root,
its absolute path), which is what stage results carry from one worker to the next.

- The work dir (`$SFTPIPE_WORK_DIR`, default ~/.cache/sft-pipeline) is this machine's scratch and download cache;
  it mirrors remote URLs as <work dir>/<protocol>/<bucket>/<path>.
- Folders the pipeline writes (models, adapters) are immutable once published: `publish` writes a `.published`
  marker last, a stage's output counts as finished only with it, and `fetch` downloads it once. Other folders (a
  base model someone put in a bucket) are downloaded again when their listing changes.
- Files (inputs, the warehouse) are fetched again when the remote object changes (its info: size, ETag, ...).
- `lease(url)` is an exclusive lock object created next to url with an atomic create (O_EXCL locally,
  If-None-Match on S3), refreshed while held, and broken when its holder is gone: how writers of the one mutable
  object, the warehouse, take turns across machines.
Credentials and endpoints come from the environment of each worker (AWS_*, GOOGLE_*, FSSPEC_* variables), never
from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

import fsspec

WORK_DIR_ENV = "SFTPIPE_WORK_DIR"
PUBLISHED = ".published"
LEASE_TTL_S = 120.0  # a lease not refreshed for this long belongs to a holder that is gone
LEASE_NOTE_S = 5.0  # a writer waiting for a lease says who holds it this often

log = logging.getLogger("sftpipe.storage")


class StorageBusy(RuntimeError):
    """A lease is held by another process for longer than we are willing to wait."""


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def is_local(url: str | Path) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def normalize(url: str | Path) -> str:
    """A canonical name: an absolute path for local places (file:// stripped), the URL without a trailing / else."""
    text = str(url)
    if is_local(text):
        path = Path(text.removeprefix("file://")).expanduser()
        try:
            return str(path.resolve())
        except RuntimeError:  # a symlink loop: name it as it is; opening it tells the caller what is wrong
            return os.path.abspath(path)
    return text.rstrip("/")


def join(url: str | Path, *parts: str) -> str:
    base = normalize(url)
    return str(Path(base, *parts)) if is_local(base) else "/".join([base, *(p.strip("/") for p in parts)])


def work_dir() -> Path:
    return Path(os.environ.get(WORK_DIR_ENV) or Path.home() / ".cache" / "sft-pipeline").expanduser().resolve()


def local_path(url: str | Path) -> Path:
    """Where this machine keeps url's content (url itself when it is local)."""
    url = normalize(url)
    if is_local(url):
        return Path(url)
    fs, path = _fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return work_dir() / protocol / path


def _fresh(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) with fsspec's listing cache for it dropped: another machine may have just written it."""
    fs, path = _fs(normalize(url))
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str | Path) -> bool:
    fs, path = _fresh(url)
    return fs.exists(path)


def is_dir(url: str | Path) -> bool:
    fs, path = _fresh(url)
    return fs.isdir(path)


def is_under(url: str | Path, folder: str | Path) -> bool:
    url, folder = normalize(url), normalize(folder)
    return url == folder or url.startswith(folder.rstrip("/") + "/")


def read_text(url: str | Path) -> str:
    fs, path = _fresh(url)
    return fs.cat_file(path).decode("utf-8")


def write_text(url: str | Path, text: str) -> str:
    """Write a small file whole: readers see the old content or the new, never part of it."""
    url = normalize(url)
    if is_local(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    else:
        fs, path = _fs(url)
        fs.pipe_file(path, text.encode("utf-8"))  # one PUT: atomic on object stores
    return url


def list_files(url: str | Path, suffix: str = "") -> list[str]:
    """Names (URLs) of the files directly inside folder url that end with suffix, sorted; [] when it is absent."""
    fs, path = _fresh(url)
    if not fs.isdir(path):
        return []
    return sorted(normalize(fs.unstrip_protocol(e["name"])) for e in fs.ls(path, detail=True)
                  if e["type"] == "file" and e["name"].endswith(suffix))


def find_files(url: str | Path) -> list[str]:
    """Every file under url (url itself when it is a file), as URLs, sorted."""
    fs, path = _fresh(url)
    if not fs.isdir(path):
        return [normalize(url)]
    return sorted(normalize(fs.unstrip_protocol(f)) for f in fs.find(path))


# ------------------------------------------------------------------------------------------------ fetch / publish
def publish(url: str | Path, source: Path | None = None) -> str:
    """Upload the local copy of url (a file or a folder) to url; a folder's `.published` marker goes last.

    `source`: upload this file instead and then make it the local copy (how the warehouse writer's private copy
    goes back without a window in which the local copy is newer than the remote one)."""
    url = normalize(url)
    local = local_path(url)
    if source is not None:
        if not is_local(url):
            fs, path = _fs(url)
            fs.put_file(str(source), path)
            _remember_version(source, _stamp(fs.info(path)))
            _version_file(source).replace(_version_file(local))
        if Path(source) != local:
            Path(source).replace(local)
        return url
    if not local.exists():
        raise FileNotFoundError(f"nothing to publish at {local}")
    if local.is_dir():
        files = sorted(f for f in local.rglob("*") if f.is_file() and f.name != PUBLISHED)
        if not is_local(url):
            fs, path = _fs(url)
            for f in files:
                fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")
        marker = json.dumps({"files": len(files), "bytes": sum(f.stat().st_size for f in files), "at": time.time()})
        write_text(join(url, PUBLISHED), marker)
        (local / PUBLISHED).write_text(marker)
    elif not is_local(url):
        fs, path = _fs(url)
        fs.put_file(str(local), path)
        _remember_version(local, _stamp(fs.info(path)))
    return url


def private_copy(url: str | Path) -> Path:
    """A writable copy of file url for this process alone: url itself when local (its own locking applies), else a
    copy of the fetched file (or a fresh path when there is none yet) that `publish(url, source=...)` puts back."""
    url = normalize(url)
    local = local_path(url)
    if is_local(url):
        return local
    private = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.writing")
    private.parent.mkdir(parents=True, exist_ok=True)
    if exists(url):
        shutil.copyfile(fetch(url), private)
    return private


def is_published(url: str | Path) -> bool:
    return exists(join(url, PUBLISHED))


def fetch(url: str | Path) -> Path:
    """The local copy of url, downloaded when missing or (for a file) changed remotely. Local urls are returned as
    they are. FileNotFoundError names a missing URL."""
    url = normalize(url)
    local = local_path(url)
    if is_local(url):
        if not local.exists():
            raise FileNotFoundError(f"{url} does not exist")
        return local
    fs, path = _fresh(url)
    try:
        info = fs.info(path)  # one request answers whether it exists, is a folder, and which version it is
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None
    if info["type"] == "directory":
        return _fetch_folder(fs, path, url, local)
    version = _stamp(info)
    if local.is_file() and _version_of(local) == version:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    fs.get_file(path, str(tmp))
    _remember_version(tmp, version)
    _version_file(tmp).replace(_version_file(local))
    tmp.replace(local)  # atomic: a process reading the old copy keeps its open file
    return local


def fetched(ref: str | Path) -> str:
    """For loaders that take a path or a hub id (from_pretrained): a URL's local copy, anything else as it is."""
    return str(ref) if is_local(ref) else str(fetch(ref))


def _fetch_folder(fs, path: str, url: str, local: Path) -> Path:
    """A published output (or a folder inside one, such as the adapter in a stage's output) is immutable: it is
    downloaded whole, once. Any other folder (say a model someone put in a bucket) is downloaded again whenever its
    listing changes."""
    inner, unit, unit_local = Path(), path, local
    while True:
        if (unit_local / PUBLISHED).exists():
            return unit_local / inner
        if fs.exists(f"{unit}/{PUBLISHED}"):
            _download_folder(fs, unit, unit_local)
            return unit_local / inner
        if "/" not in unit.strip("/"):
            break
        inner = Path(PurePosixPath(unit).name) / inner
        unit, unit_local = str(PurePosixPath(unit).parent), unit_local.parent
    stamp = folder_fingerprint(url)
    if not (local.is_dir() and _version_of(local) == stamp):
        _download_folder(fs, path, local)
        _remember_version(local, stamp)
    return local


def folder_fingerprint(url: str | Path) -> str:
    """Identity of a folder's content from its listing (names, sizes, ETags or mtimes), without reading it."""
    fs, path = _fresh(url)
    listing = sorted((PurePosixPath(name).relative_to(path).as_posix(), info.get("size"),
                      str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
                     for name, info in fs.find(path, detail=True).items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _download_folder(fs, path: str, local: Path) -> None:
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    for remote in fs.find(path):
        target = tmp / PurePosixPath(remote).relative_to(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    if local.exists():  # an outdated copy, or an unpublished leftover of this machine's own interrupted run
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.replace(local)
    except OSError:  # another process on this machine fetched it at the same time
        shutil.rmtree(tmp, ignore_errors=True)


def _stamp(info: dict) -> str:
    """A remote file's version from its info (size, ETag or mtime, ...), as fsspec's ukey computes it; the one
    definition both publish and fetch use, so a file this machine uploaded is not downloaded again."""
    return hashlib.sha256(str(info).encode()).hexdigest()


def _version_file(local: Path) -> Path:
    return local.with_name(f".{local.name}.version")


def _version_of(local: Path) -> str | None:
    f = _version_file(local)
    return f.read_text() if f.exists() else None


def _remember_version(local: Path, version: str) -> None:
    _version_file(local).write_text(version)


# ------------------------------------------------------------------------------------------------------- leases
@contextmanager
def lease(url: str | Path, wait_s: float = 600.0, what: str = "",
          error: type[Exception] = StorageBusy) -> Iterator[None]:
    """Hold the exclusive lock object `<url>.lock` for the block; wait up to wait_s for another holder."""
    lock = normalize(url) + ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": time.time()}
    started = time.monotonic()
    deadline, next_note = started + wait_s, started + LEASE_NOTE_S
    while not _try_create(lock, me):
        holder = _read_lease(lock)
        if _is_stale(holder) if holder is not None else _unreadable_lease_is_stale(lock):
            _remove(lock)
            continue
        now = time.monotonic()
        if now > deadline:
            raise error(f"{what or normalize(url)} is in use by {_describe(holder)} (lock {lock}); "
                              f"waited {wait_s:.0f} s. Another pipeline run? Retry when it has finished.")
        if now >= next_note:
            log.warning("waiting for %s: in use by %s (lock %s); waited %.0f s, giving up after %.0f s",
                        what or normalize(url), _describe(holder), lock, now - started, wait_s)
            next_note = now + LEASE_NOTE_S
        time.sleep(1.0)
    stop = threading.Event()
    refresher = threading.Thread(target=_refresh, args=(lock, me, stop), daemon=True)
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        if (_read_lease(lock) or {}).get("token") == me["token"]:
            _remove(lock)


def _lease_body(me: dict) -> bytes:
    return json.dumps({**me, "expires": time.time() + LEASE_TTL_S}).encode()


def _try_create(lock: str, me: dict) -> bool:
    if is_local(lock):
        # Whole or not at all: the lease is written under a private name and linked into place (the link fails if
        # the name exists), so a kill can never leave an empty or half-written lease behind.
        path = Path(lock)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{me['token']}.tmp")
        tmp.write_bytes(_lease_body(me))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    fs, path = _fs(lock)
    try:
        with fs.open(path, "xb") as f:  # O_EXCL locally, If-None-Match: * on S3: exactly one creator wins
            f.write(_lease_body(me))
        return True
    except FileExistsError:
        return False


def _refresh(lock: str, me: dict, stop: threading.Event) -> None:
    fs, path = _fs(lock)
    while not stop.wait(LEASE_TTL_S / 4):
        try:
            fs.pipe_file(path, _lease_body(me))
        except Exception:  # a missed refresh only shortens the lease; the next one may succeed
            pass


def _read_lease(lock: str) -> dict | None:
    try:
        return json.loads(read_text(lock))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # gone meanwhile, or caught half-written: look again


def _unreadable_lease_is_stale(lock: str) -> bool:
    """A lease that exists but cannot be parsed (left empty or half-written by an old writer killed mid-write) is
    stale once it is older than a lease lives unrefreshed; a younger one may still be being written."""
    fs, path = _fresh(lock)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False  # gone meanwhile: try to create it again
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    return modified is None or time.time() - float(modified) > LEASE_TTL_S


def _is_stale(holder: dict) -> bool:
    if holder.get("expires", 0) < time.time():
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


def _remove(lock: str) -> None:
    fs, path = _fs(lock)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    held = f" since {time.strftime('%H:%M:%S', time.localtime(since))} ({time.time() - since:.0f} s)" if since else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{held}"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(url: str | Path | None) -> list[dict]:
    """Rows of a JSON Lines file (path or URL); [] when there is none."""
    if not url or not exists(url):
        return []
    return [json.loads(line) for line in read_text(url).splitlines() if line.strip()]


