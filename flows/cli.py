"""`sftpipe`: the short path to the pipeline. Everything it does is also reachable through Prefect.

  sftpipe demo                               run everything on the embedded sample data and a tiny local model
  sftpipe run [-c cfg.yaml] [key=value ...]  run the whole pipeline (or --until STAGE, --refresh STAGE)
  sftpipe stage STAGE [-c cfg.yaml] [k=v]    rerun one stage alone; earlier stages come from cache
  sftpipe where [-c cfg.yaml] [k=v]          print where the warehouse and outputs are
  sftpipe config [-c cfg.yaml] [k=v]         print the effective config (--describe: every field, default, meaning)
  sftpipe sql "select * from quality_summary" query the warehouse
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _setdefault_env(cfg) -> None:
    # Before Prefect is imported: keep a local run's Prefect state under the storage root (its local copy, for a
    # remote root), so a demo leaves nothing behind elsewhere and deleting the root starts afresh. Stage results and
    # caches go to <storage_root>/prefect-results whatever the root is (tasks/caching.py).
    if not os.environ.get("PREFECT_API_URL"):
        from tasks.core import storage

        os.environ.setdefault("PREFECT_HOME", str(storage.local_path(cfg.url("prefect-home"))))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads at run time; set 0 to allow hub ids
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread is several times faster for small models on CPU


def _load(args):
    from tasks.core.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"sftpipe: {err}")


def _print_where(cfg) -> None:
    from tasks.core import storage

    print(f"storage root : {cfg.root}")
    print(f"warehouse    : {cfg.warehouse_url}")
    print(f"sample data  : {cfg.sample_data_url}")
    print(f"models       : {cfg.url('models')}")
    if storage.is_local(cfg.warehouse_url):
        print(f"query        : duckdb {cfg.warehouse_url} -c \"select * from quality_summary\"")
    else:
        print(f"local copies : {storage.local_path(cfg.root)}")
        print(f"query        : sftpipe sql \"select * from quality_summary\" storage_root={cfg.storage_root}")


def _run(cfg, args, until=None, refresh=()) -> int:
    _setdefault_env(cfg)
    from flows.pipeline import sft_pipeline

    started = time.time()
    state = sft_pipeline(config_path=args.config, overrides=args.overrides, until=until, refresh=list(refresh),
                         return_state=True)
    print(f"\nflow run finished: {state.name} in {time.time() - started:.1f} s")
    if state.is_completed():
        print(json.dumps(state.result(), indent=2, default=str))
    _print_where(cfg)
    return 0 if state.is_completed() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sftpipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.dedup.threshold=0.7")
        return p

    add("demo", "run the whole pipeline on the embedded sample data")
    run = add("run", "run the whole pipeline")
    run.add_argument("--until", help="stop after this stage")
    run.add_argument("--refresh", action="append", default=[], help="recompute this stage even if cached (repeatable)")
    stage = add("stage", "rerun one stage alone (earlier stages come from cache)")
    stage.add_argument("stage")
    add("where", "print where the warehouse and outputs are")
    conf = add("config", "print the effective config")
    conf.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    sql = sub.add_parser("sql", help="run a SQL query against the warehouse")
    sql.add_argument("query")
    sql.add_argument("-c", "--config")
    sql.add_argument("overrides", nargs="*", default=[])

    args = parser.parse_args(argv)
    cfg = _load(args)
    if args.command in ("demo", "run"):
        return _run(cfg, args, getattr(args, "until", None), getattr(args, "refresh", []))
    if args.command == "stage":
        return _run(cfg, args, until=args.stage, refresh=[args.stage])
    if args.command == "where":
        _print_where(cfg)
    elif args.command == "config":
        if args.describe:
            from tasks.core.config import describe_fields

            for name, default, doc in describe_fields():
                print(f"{name} = {default}\n    {doc}")
        else:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    elif args.command == "sql":
        from tasks.core import storage
        from tasks.core.warehouse import open_warehouse

        if not storage.exists(cfg.warehouse_url):
            sys.exit(f"sftpipe: no warehouse at {cfg.warehouse_url}; run `sftpipe run` first")
        with open_warehouse(cfg.warehouse_url, read_only=True) as con:
            con.sql(args.query).show(max_width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
