"""What a remote storage root costs: the whole pipeline on a local root and on an s3:// root, side by side.

    .venv/bin/python -m benchmarks.storage.run [--repeats 3]

For each root: a cold run of the embedded default, fully cached reruns on the same machine, a fully cached rerun
from an empty work dir (another machine: nothing of the bucket cached locally), and a new DPO beta from an empty
work dir (dpo, merge, evaluate, serve and promote rerun; the base and SFT models come from the bucket). Every run is
`sftpipe run` in a fresh process against one Prefect server started here. The S3 endpoint is moto's server on
127.0.0.1 (no network here), so the s3 column shows the pipeline's own overhead of staging files, not a real
network's latency. Writes benchmarks/results/storage.json and .md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import BENCH_ENV, OUT, ROOT, machine, summary, write_results

BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(cmd: list[str], probe: str, env: dict, log: Path):
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(probe, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start; see {log}")
                time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _bucket_bytes(url: str) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return sum(fs.du(path, total=False).values())


def sftpipe_run(root: str, work_dir: Path, *overrides: str) -> dict:
    env = {**BENCH_ENV, "SFTPIPE_WORK_DIR": str(work_dir)}
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "sftpipe"), "run", f"storage_root={root}", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    found = re.search(r"flow run finished: (\w+) in ([\d.]+) s", out.stdout)
    # A rejected promotion is a finished run (exit 1 by design): every stage ran, the gate said no.
    if not found or found.group(1) not in ("Promoted", "PromotionRejected"):
        raise RuntimeError(f"sftpipe run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    import fsspec

    # the full log (path on the summary's last line) has Prefect's line per task run, minhash shards included
    with fsspec.open(re.search(r"full log\s+(\S+)", out.stdout).group(1), "r") as log:
        cached = len(re.findall(r"Finished in state Cached", log.read()))
    return {"wall_s": round(wall, 2), "flow_s": float(found.group(2)), "state": found.group(1),
            "cached_tasks": cached}


def measure(kind: str, root: str, out: Path, repeats: int) -> dict:
    home = out / kind
    machine_a, machine_b = home / "work-a", home / "work-b"
    result = {"root": root, "cold": sftpipe_run(root, machine_a)}
    result["cached_same_machine"] = [sftpipe_run(root, machine_a) for _ in range(repeats)]
    fresh = []
    for i in range(repeats):
        shutil.rmtree(machine_b, ignore_errors=True)
        fresh.append(sftpipe_run(root, machine_b))
    result["cached_other_machine"] = fresh
    result["downloaded_for_cached_bytes"] = _du(machine_b)
    shutil.rmtree(machine_b, ignore_errors=True)
    result["new_dpo_beta_other_machine"] = sftpipe_run(root, machine_b, "dpo.beta=0.3")
    result["downloaded_for_new_beta_bytes"] = _du(machine_b)
    result["root_bytes"] = _bucket_bytes(root) if root.startswith("s3://") else _du(Path(root))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = OUT / "storage"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    prefect_port, s3_port = _free_port(), _free_port()
    env = {**BENCH_ENV, "PREFECT_HOME": str(out / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    s3 = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "bench",
          "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(s3)
    BENCH_ENV.update(s3, PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api", PREFECT_HOME=str(out / "prefect-home"))
    with _server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                 f"http://127.0.0.1:{prefect_port}/api/health", env, out / "prefect.log"), \
         _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                 f"http://127.0.0.1:{s3_port}/moto-api/", env, out / "moto.log"):
        import fsspec

        fsspec.filesystem("s3").mkdir("bench")
        results = {"local": measure("local", str(out / "local" / "runs"), out, args.repeats),
                   "s3": measure("s3", "s3://bench/runs", out, args.repeats)}
    payload = {"machine": machine(), "repeats": args.repeats, "results": results,
               "command": "python -m benchmarks.storage.run"}

    def cell(runs):
        runs = runs if isinstance(runs, list) else [runs]
        s = summary([r["wall_s"] for r in runs])
        return f"{s['median']:.1f} s ({s['min']:.1f}–{s['max']:.1f})" if len(runs) > 1 else f"{s['median']:.1f} s"

    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    rows = [("cold run, whole DAG", "cold"), ("fully cached rerun, same machine", "cached_same_machine"),
            ("fully cached rerun, empty work dir", "cached_other_machine"),
            ("new DPO beta, empty work dir", "new_dpo_beta_other_machine")]
    md = ["| run (wall per `sftpipe run` process) | local root | s3:// root |", "|---|---|---|"]
    md += [f"| {label} | {cell(results['local'][key])} | {cell(results['s3'][key])} |" for label, key in rows]
    md += [f"| downloaded for the cached rerun on an empty work dir | – | "
           f"{mib(results['s3']['downloaded_for_cached_bytes'])} |",
           f"| downloaded for the new beta on an empty work dir | – | "
           f"{mib(results['s3']['downloaded_for_new_beta_bytes'])} |",
           f"| everything under the root at the end | {mib(results['local']['root_bytes'])} | "
           f"{mib(results['s3']['root_bytes'])} |", ""]
    states = {k: r["cold"]["state"] for k, r in results.items()}
    md.append(f"Final states of the cold runs: {states}. Each wall time includes the process start and imports "
              "(about 6 s); the S3 endpoint is local (moto), so network latency is not in these numbers.")
    js, mdf = write_results("storage", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {js} and {mdf}")


if __name__ == "__main__":
    main()
