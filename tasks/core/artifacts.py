"""Prefect artifacts (what the UI shows): published only inside a flow or task run, so plain calls stay offline."""

from __future__ import annotations

import logging

log = logging.getLogger("sftpipe")


def in_prefect_run() -> bool:
    try:
        from prefect.context import get_run_context

        get_run_context()
        return True
    except Exception:  # MissingContextError outside a flow/task run
        return False


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside Prefect; always logged."""
    log.info("%s\n%s", description, markdown)
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as err:  # the UI is a view: never fail a training stage because it is unreachable
        log.warning("could not publish artifact %s: %s", key, err)


def in_flow_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(FlowRunContext.get() or TaskRunContext.get())


def publish_artifacts(markdown: dict[str, tuple[str, str]] | None = None,
                      tables: dict[str, tuple[list[dict], str]] | None = None) -> list[str]:
    """Markdown / table artifacts under stable keys, only inside a flow run (plain calls stay offline)."""
    if not in_flow_run():
        return []
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    made = []
    for key, (text, description) in (markdown or {}).items():
        create_markdown_artifact(markdown=text, key=key, description=description)
        made.append(key)
    for key, (rows, description) in (tables or {}).items():
        create_table_artifact(table=rows, key=key, description=description)
        made.append(key)
    return made
