"""`sftpipe`: the short path to the pipeline. Everything it does is also reachable through Prefect.

  sftpipe demo [key=value ...]                 run everything on the embedded sample data and a tiny local model
  sftpipe run [-c cfg.yaml] [key=value ...]    run the whole pipeline
  sftpipe run --until STAGE --refresh STAGE    stop after a stage; recompute a stage even if cached
  sftpipe stage STAGE [-c cfg.yaml] [k=v]      rerun one stage alone; earlier stages come from cache
  sftpipe where [-c cfg.yaml] [k=v]            print where the warehouse and outputs are (and a duckdb command)
  sftpipe config [-c cfg.yaml] [k=v]           print the effective config (--describe: every field, default, meaning)
  sftpipe sql "select * from quality_summary"  query the warehouse (read-only)

run / demo / stage print a line per stage and a summary; everything the libraries print goes to the full log
(<storage_root>/logs/), and --verbose shows it as well.

Before running a flow it sets, unless already set: PREFECT_HOME=<storage root>/prefect-home (only without
PREFECT_API_URL, so a local run keeps its Prefect state with its outputs), PREFECT_SERVER_ANALYTICS_ENABLED=false,
HF_HUB_OFFLINE=1 for the embedded base (nothing to download) and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


EPHEMERAL_STARTUP_S = 300


def _setdefault_env(cfg) -> None:
    # Before Prefect is imported: keep a local run's Prefect state under the storage root (its local copy, for a
    # remote root), so a demo leaves nothing behind elsewhere and deleting the root starts afresh. Stage results and
    # caches go to <storage_root>/prefect-results whatever the root is (tasks/core/caching.py).
    if not os.environ.get("PREFECT_API_URL"):
        from tasks.core import storage

        os.environ.setdefault("PREFECT_HOME", str(storage.local_path(cfg.url("prefect-home"))))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        # The temporary server of a new home migrates its database before it answers: longer than Prefect's 20 s
        # default on a busy small machine.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if cfg.model.base == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: no hub lookups at all
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread is several times faster for small models on CPU


def _load(args):
    from tasks.core.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"sftpipe: {err}")


def duckdb_cli() -> str:
    """The DuckDB CLI setup installs next to this Python (.venv/bin/duckdb), else the one on PATH."""
    beside = Path(sys.executable).parent / "duckdb"
    return str(beside) if beside.is_file() else shutil.which("duckdb") or "duckdb"


def query_command(cfg, sql: str = "select * from quality_summary") -> str:
    """A command a person can paste to query the warehouse (the DuckDB CLI for a local one)."""
    from tasks.core import storage

    if storage.is_local(cfg.warehouse_url):
        return f'{duckdb_cli()} -readonly {cfg.warehouse_url} -c "{sql}"'
    return f'sftpipe sql "{sql}" storage_root={cfg.storage_root}'


def where_lines(cfg) -> list[tuple[str, str]]:
    from tasks.core import storage

    lines = [("storage root", cfg.root), ("warehouse", cfg.warehouse_url), ("sample data", cfg.sample_data_url),
             ("models", cfg.url("models"))]
    if not storage.is_local(cfg.root):
        lines.append(("local copies", str(storage.local_path(cfg.root))))
    if cfg.tracking.mlflow_uri:
        lines.append(("mlflow", f"{cfg.tracking.mlflow_uri} (experiment {cfg.tracking.mlflow_experiment})"))
    return lines + [("query", query_command(cfg))]


def _pipeline_run(sft_pipeline, args, until, refresh, terminal):
    """The flow run; once more when Prefect's temporary server did not come up in time (a new home migrates its
    database first), saying so."""
    for attempt in (1, 2):
        try:
            return sft_pipeline(config_path=args.config, overrides=args.overrides, until=until, refresh=list(refresh),
                                return_state=True)
        except RuntimeError as err:
            if attempt == 2 or "ephemeral Prefect API server" not in str(err):
                raise
            terminal.print(f"sftpipe: the temporary Prefect server did not start within "
                           f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')} s; trying once "
                           f"more (set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS to wait longer, or "
                           f"PREFECT_API_URL to use a running server)", markup=False)


def _run(cfg, args, until=None, refresh=()) -> int:
    from flows.terminal import Terminal, output_to_log
    from tasks.core import progress, storage

    _setdefault_env(cfg)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_url = cfg.url("logs", f"sftpipe-{args.command}-{stamp}.log")
    log_path = storage.local_path(log_url)
    started = time.time()
    state = None
    with output_to_log(log_path, verbose=args.verbose) as stream, Terminal(stream) as terminal:
        terminal.print(f"sftpipe {args.command}: storage root {cfg.root}")
        try:
            from flows.pipeline import sft_pipeline

            with progress.listening(terminal):
                state = _pipeline_run(sft_pipeline, args, until, refresh, terminal)
        except Exception as err:  # e.g. Prefect's temporary server did not start; the traceback is in the log
            import traceback

            traceback.print_exc()
            terminal.print(f"[bold red]sftpipe: {type(err).__name__}[/]: {err}", markup=True, overflow="fold")
        _stop_temporary_server()
        name = state.name if state is not None else "Crashed"
        terminal.print(f"\nflow run finished: {name} in {time.time() - started:.1f} s", markup=False)
        if state is not None and not state.is_completed() and "promote" not in terminal.results:
            terminal.print(f"[bold red]{name}[/]: {state.message or ''}", markup=True, overflow="fold")
        if not storage.is_local(log_url):
            storage.publish(log_url)
        terminal.summary(state, [*where_lines(cfg)[1:], ("full log", log_url)])
    return 0 if state is not None and state.is_completed() else 1


def _stop_temporary_server() -> None:
    """Prefect stops its temporary server at exit; stopping it now sends its farewell to the log, not the terminal."""
    try:
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        if SubprocessASGIServer._instances:
            APILogWorker.drain_all(timeout=5)  # buffered run logs first, or they fail to send to a stopped server
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001 - at worst the farewell line reaches the terminal
        pass


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help and errors) and each command's own parser."""
    parser = argparse.ArgumentParser(prog="sftpipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name, help_, *positionals: tuple[str, str]):
        p = commands[name] = sub.add_parser(name, help=help_)
        for arg, arg_help in positionals:  # before the overrides, so `stage dpo dpo.beta=0.2` binds as written
            p.add_argument(arg, help=arg_help)
        p.add_argument("-c", "--config", help="YAML config file or URL (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.dedup.threshold=0.7")
        return p

    def runs(p):
        p.add_argument("-v", "--verbose", action="store_true", help="also show what the libraries print (the full log)")
        return p

    runs(add("demo", "run the whole pipeline on the embedded sample data"))
    run = runs(add("run", "run the whole pipeline"))
    run.add_argument("--until", help="stop after this stage")
    run.add_argument("--refresh", action="append", default=[], help="recompute this stage even if cached (repeatable)")
    runs(add("stage", "rerun one stage alone (earlier stages come from cache)", ("stage", "the stage to rerun")))
    add("where", "print where the warehouse and outputs are")
    conf = add("config", "print the effective config")
    conf.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    add("sql", "run a SQL query against the warehouse", ("query", "SQL, e.g. \"select * from quality_summary\""))
    return parser, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # usage, --help or an "invalid choice" error
    # intermixed: options may sit between positionals (`stage dpo -c my.yaml dpo.beta=0.2`); argparse cannot
    # intermix through subparsers, so the command's own parser reads the rest
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "stage" and "=" in args.stage:
        sys.exit(f"sftpipe: unknown stage {args.stage!r}: the stage name comes first, e.g. sftpipe stage dpo dpo.beta=0.2")
    cfg = _load(args)
    if args.command in ("demo", "run"):
        return _run(cfg, args, getattr(args, "until", None), getattr(args, "refresh", []))
    if args.command == "stage":
        _setdefault_env(cfg)  # before Prefect is imported
        from flows.stages import BY_NAME

        if args.stage not in BY_NAME:
            sys.exit(f"sftpipe: unknown stage {args.stage!r}; stages are: {', '.join(BY_NAME)}")
        return _run(cfg, args, until=args.stage, refresh=[args.stage])
    if args.command == "where":
        for label, value in where_lines(cfg):
            print(f"{label:<13}: {value}")
    elif args.command == "config":
        if args.describe:
            from tasks.core.config import describe_fields

            for name, default, doc in describe_fields():
                print(f"{name} = {default}\n    {doc}")
        else:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    elif args.command == "sql":
        import duckdb

        from tasks.core import storage
        from tasks.core.warehouse import query_connection

        if not storage.exists(cfg.warehouse_url):
            sys.exit(f"sftpipe: no warehouse at {cfg.warehouse_url}; run `sftpipe run` first")
        with query_connection(cfg.warehouse_url, note=lambda m: print(f"sftpipe: {m}", file=sys.stderr)) as con:
            try:
                con.sql(args.query).show(max_width=200)
            except duckdb.PermissionException as err:
                sys.exit(f"sftpipe: {err}\n`sftpipe sql` reads the warehouse only; use duckdb itself to write files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
