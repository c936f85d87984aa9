"""The `sftpipe` CLI as a person uses it: every usage line the CLI and the README print, the DuckDB command
`sftpipe where` prints (run verbatim), and the terminal of `sftpipe run` (stage lines; library output in the log)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from flows import cli
from tasks.core.config import load_config

SFTPIPE = [sys.executable, "-m", "flows.cli"]  # this checkout's CLI (what .venv/bin/sftpipe runs)


def _usage_lines() -> list[str]:
    """`sftpipe ...` command lines from the CLI's help text and the README's shell blocks."""
    lines = [line.strip().split("  ")[0] for line in cli.__doc__.splitlines() if line.strip().startswith("sftpipe ")]
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            if "bin/sftpipe " in line:
                lines.append(line[line.index("sftpipe "):].split("  #")[0].strip())
    return lines


USAGE = _usage_lines()


def _concrete(line: str, tmp_path: Path) -> list[str]:
    """A usage line with its placeholders filled: a stage, a config file, an override."""
    config = tmp_path / "settings.yaml"
    config.write_text(f"storage_root: {tmp_path / 'runs'}\n")
    line = line.replace("[-c cfg.yaml]", f"-c {config}").replace("[key=value ...]", "dpo.beta=0.2")
    line = line.replace("[k=v]", "dpo.beta=0.2").replace("STAGE", "dpo").replace("my.yaml", str(config))
    return shlex.split(line)[1:]


def test_usage_lines_are_found():
    commands = {line.split()[1] for line in USAGE}
    assert {"demo", "run", "stage", "where", "config", "sql"} <= commands, USAGE


@pytest.mark.parametrize("line", USAGE)
def test_every_usage_line_parses_as_written(line, tmp_path):
    argv = _concrete(line, tmp_path)
    args = cli.parse_args(argv)
    assert args.command == argv[0]
    assert all("=" in o for o in args.overrides), args.overrides  # no positional swallowed as an override
    if args.command == "stage":
        from flows.stages import BY_NAME

        assert args.stage in BY_NAME
    if "s3://" not in line:  # the bucket is an example; everything else loads as a config
        cfg = load_config(args.config, args.overrides)
        if "dpo.beta=0.2" in argv:
            assert cfg.dpo.beta == 0.2


def test_stage_name_first_then_options_and_overrides(tmp_path):
    args = cli.parse_args(["stage", "dpo", "-c", "my.yaml", "dpo.beta=0.2"])
    assert (args.stage, args.config, args.overrides) == ("dpo", "my.yaml", ["dpo.beta=0.2"])
    out = subprocess.run([*SFTPIPE, "stage", "dpo.beta=0.2", "dpo", f"storage_root={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "unknown stage 'dpo.beta=0.2'" in out.stderr


def test_where_config_and_sql_run_as_printed(tmp_path, capsys):
    from tasks.core.warehouse import open_warehouse

    root = tmp_path / "runs"
    assert cli.main(["config", f"storage_root={root}", "dpo.beta=0.2"]) == 0
    assert "beta: 0.2" in capsys.readouterr().out
    with open_warehouse(root / "warehouse.duckdb"):
        pass  # an empty warehouse: schema and views
    assert cli.main(["sql", "select count(*) AS n from quality_summary", f"storage_root={root}"]) == 0
    assert "n" in capsys.readouterr().out


def test_printed_duckdb_command_opens_the_warehouse(tmp_path, capsys):
    """`sftpipe where` prints a DuckDB CLI command; run it verbatim in a shell against a real warehouse."""
    from conftest import run_data_plane

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name river number {i}.", "input": "",
                                        "output": f"River number {i} is long."}) + "\n" for i in range(30)))
    overrides = [f"storage_root={tmp_path / 'runs'}", f"data.ingest.inputs=[{data}]"]
    run_data_plane(load_config(None, overrides))
    assert cli.main(["where", *overrides]) == 0
    (command,) = [line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                  if line.startswith("query")]
    assert command.split()[0].endswith("duckdb") and "-readonly" in command
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "│ data " in line)
    assert [cell.strip() for cell in row.strip("│").split("│")][:4] == ["data", "1", "30", "30"]


def test_run_prints_a_line_per_stage_and_logs_the_rest(tmp_path):
    """`sftpipe run --until split` against the session's Prefect server: a line per stage, Prefect's own logging in
    the full log only; the second run's lines say cached."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name lake number {i}.", "input": "",
                                        "output": f"Lake number {i} is deep."}) + "\n" for i in range(40)))
    argv = [*SFTPIPE, "run", "--until", "split", f"storage_root={tmp_path / 'runs'}", f"data.ingest.inputs=[{data}]"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    for stage in ("ingest", "clean", "dedup", "split"):
        assert any(re.match(rf"\s+{stage}\s+ran\s+\d+\.\d+s\s+\S", line) for line in lines), first.stdout
    assert "Task run" not in first.stdout + first.stderr  # Prefect's console logging went to the log
    assert re.search(r"dedup\s+ran.*40 kept", first.stdout)
    log = Path(next(line.split()[-1] for line in lines if line.strip().startswith("full log")))
    assert log.is_file() and re.search(r"Task run 'split-\w+' - Finished in state Completed", log.read_text())

    again = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(re.search(rf"\s{stage}\s+cached\s", again.stdout) for stage in ("ingest", "clean", "dedup", "split"))


@pytest.mark.parametrize("verbose", [False, True])
def test_library_output_goes_to_the_full_log_and_verbose_shows_it(tmp_path, verbose):
    """What Python, C code and child processes print lands in the log; the terminal gets ours (and, verbose, theirs)."""
    log = tmp_path / "full.log"
    script = (
        "import subprocess, sys, warnings\n"
        "from pathlib import Path\n"
        "from flows.terminal import output_to_log\n"
        f"with output_to_log(Path({str(log)!r}), verbose={verbose}) as terminal:\n"
        "    print('a library progress bar', flush=True)\n"
        "    warnings.warn('is_gradient_checkpointing is deprecated', FutureWarning)\n"
        "    subprocess.run(['sh', '-c', 'echo from a child process >&2'])\n"
        "    terminal.write('ingest ran\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    library = ("a library progress bar", "is_gradient_checkpointing is deprecated", "from a child process")
    assert all(text in log.read_text() for text in library)
    shown = out.stdout + out.stderr
    assert "ingest ran" in out.stdout
    assert all((text in shown) == verbose for text in library), shown
