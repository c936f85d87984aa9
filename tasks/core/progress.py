"""Progress events (a stage started or finished, a training step) for whoever shows them.

Nothing listens unless a caller subscribes with `listening` (the `sftpipe` terminal does), so a Prefect worker or a
test pays one empty loop per event. Listeners are per process and called in the emitting thread; one that raises
is logged and skipped: showing progress never fails a stage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("sftpipe")

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call listener(event, fields) for every event emitted in this process while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def emit(event: str, **fields: Any) -> None:
    """Events: stage_started(stage), stage_finished(stage, state, seconds, result | error), and
    advance(stage, done, total): how far a stage is (training steps, files downloaded)."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event, fields)
        except Exception as err:  # noqa: BLE001 - a display problem must not fail the pipeline
            log.debug("progress listener failed on %s: %s", event, err)
