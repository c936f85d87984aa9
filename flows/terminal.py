"""What `sftpipe run` / `demo` / `stage` show a person: one line per stage, a progress bar while a stage runs, and
a summary (eval headline per variant against the base, the promotion decision, where things are).

Everything else the libraries print (Prefect's logs, datasets' progress bars, deprecation warnings, launched
processes) goes to a full log file under the storage root: file descriptors 1 and 2 are pointed at it for the
run, so output of C extensions and child processes lands there too. `--verbose` also copies it to the terminal.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tasks.core.results import PromotionResult, StageResult

SUMMARY_VARIANTS = ("base", "sft", "dpo", "kto", "merged")


@contextmanager
def output_to_log(log_path: Path, verbose: bool = False) -> Iterator[IO[str]]:
    """Send this process's stdout and stderr (and its children's) to log_path; yield a stream to the real terminal.

    verbose: the log is also copied to the terminal as it is written."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_path, "ab", buffering=0)
    tee = None
    if verbose:
        read_end, write_end = os.pipe()
        tee = threading.Thread(target=_copy, args=(read_end, log, saved[1]), daemon=True, name="sftpipe-tee")
        tee.start()
        target = write_end
    else:
        target = log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        if tee is not None:
            os.close(write_end)
            tee.join(timeout=2)  # children that still hold the pipe (Prefect's server) may keep it open
        for fd in saved:
            os.close(fd)
        terminal.flush()
        log.close()


def _copy(read_end: int, log, terminal_fd: int) -> None:
    while chunk := os.read(read_end, 65536):
        log.write(chunk)
        try:
            os.write(terminal_fd, chunk)
        except OSError:
            pass


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def headline(stage: str, result: StageResult | None) -> str:
    """The one figure that says whether a stage did its job."""
    if result is None:
        return ""
    s = result.stats
    if stage == "ingest":
        return f"{_num(s.get('new_rows'))} new rows from {_num(s.get('new_files'))} new files " \
               f"({_num(s.get('warehouse_rows'))} rows in the warehouse)"
    if stage == "clean":
        rejected = sum((s.get("rejected_by_reason") or {}).values())
        return f"{_num(s.get('passed'))} rows passed, {_num(rejected)} rejected"
    if stage == "quality":
        rejected = sum((s.get("rejected_by_reason") or {}).values())
        return f"{_num(s.get('passed'))} rows passed, {_num(rejected)} rejected, {_num(s.get('redacted_rows'))} " \
               f"with personal data redacted"
    if stage == "dedup":
        return f"{_num(s.get('kept'))} kept, {_num(s.get('exact_duplicates'))} exact and " \
               f"{_num(s.get('near_duplicates'))} near duplicates"
    if stage == "split":
        return f"train {_num(s.get('train'))} / validation {_num(s.get('validation'))} / test {_num(s.get('test'))}"
    if stage == "base":
        if s.get("kind") != "embedded":
            return f"{result.path}" + (f" @ {s['revision'][:12]}" if s.get("revision") else "")
        loss = s.get("warmup_loss") or {}
        return f"embedded, warm-up loss {_num(loss.get('first'))} → {_num(loss.get('last'))}"
    if stage in ("sft", "dpo", "kto"):
        parts = [f"loss {_num(s.get('first_loss'))} → {_num(s.get('last_loss'))}"]
        if s.get("eval_reward_accuracy") is not None:
            parts.append(f"validation preference accuracy {_num(s['eval_reward_accuracy'])}")
        elif s.get("last_eval_loss") is not None:
            parts.append(f"validation loss {_num(s.get('first_eval_loss'))} → {_num(s['last_eval_loss'])}")
        if s.get("tokens_per_s"):
            parts.append(f"{_num(s['tokens_per_s'])} tokens/s")
        return ", ".join(parts)
    if stage == "merge":
        return f"logit parity with the adapter: max |Δ| {_num(s.get('max_abs_logit_diff'), 2)}"
    if stage == "evaluate":
        merged = result.metrics.get("merged") or {}
        return f"merged: test perplexity {_num(merged.get('perplexity/test'))}, " \
               f"ROUGE-L {_num(merged.get('rougeL/test'))}"
    if stage == "serve":
        parity = ", ".join(f"{k} {v}" for k, v in (s.get("parity") or {}).items())
        return f"vLLM greedy parity {parity}, {_num(s.get('tokens_per_s'))} tokens/s"
    if stage == "promote":
        return result.decision
    return ""


class Terminal:
    """A progress listener (tasks/core/progress.py) that draws on the real terminal."""

    def __init__(self, stream: IO[str]):
        # a pipe or file (CI logs, tests) gets whole lines; a terminal gets lines cut or folded to its width
        width = min(shutil.get_terminal_size((100, 24)).columns, 120) if stream.isatty() else 200
        self.console = Console(file=stream, width=width, highlight=False, soft_wrap=False)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<9}"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)
        self.tasks: dict[str, Any] = {}
        self.results: dict[str, StageResult] = {}
        self.failed: dict[str, str] = {}

    def __enter__(self) -> Terminal:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def print(self, *args, **kwargs) -> None:
        self.console.print(*args, **kwargs)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        stage = fields.get("stage", "")
        if stage == "minhash-shard":
            return
        if event == "stage_started" and stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=None)
        elif event == "advance":
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=None)
            self.progress.update(self.tasks[stage], total=fields.get("total"), completed=fields.get("done", 0))
        elif event == "stage_finished":
            if (task := self.tasks.pop(stage, None)) is not None:
                self.progress.remove_task(task)
            self.stage_line(stage, fields)

    def stage_line(self, stage: str, fields: dict[str, Any]) -> None:
        state = fields["state"]
        if state == "failed":
            self.failed[stage] = fields.get("error", "")
            text = fields.get("error", "")
        else:
            self.results[stage] = fields.get("result")
            text = headline(stage, self.results[stage])
        style = {"ran": "green", "cached": "blue", "failed": "bold red"}[state]
        self.console.print(f"  {stage:<9} [{style}]{state:<6}[/] {fields.get('seconds', 0):6.1f}s  {text}",
                           markup=True, overflow="fold" if state == "failed" else "ellipsis", no_wrap=state != "failed")

    def summary(self, final_state, where: list[tuple[str, str]]) -> None:
        """Eval headline per variant against the base, the promotion decision and its reasons, where things are."""
        metrics = ev.metrics if (ev := self.results.get("evaluate")) else {}
        if metrics:
            self.console.print()
            self.console.print(eval_table(metrics))
        decision = self.results.get("promote")
        if decision:
            self.console.print(promotion_lines(decision), markup=True)
        elif final_state is not None and not final_state.is_completed():
            self.console.print(f"[bold red]{final_state.name}[/]: {final_state.message or ''}", markup=True)
        self.console.print()
        for label, value in where:
            self.console.print(f"  {label:<12} {value}", overflow="fold")


def eval_table(metrics: dict[str, dict[str, float]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", title=None)
    for col in ("variant", "test perplexity", "vs base", "test ROUGE-L", "vs base", "preference acc."):
        table.add_column(col, justify="left" if col == "variant" else "right")
    base = metrics.get("base") or {}
    for variant in [v for v in SUMMARY_VARIANTS if v in metrics] + [v for v in metrics if v not in SUMMARY_VARIANTS]:
        m = metrics[variant]
        ppl, rouge = m.get("perplexity/test"), m.get("rougeL/test")
        ppl_delta = f"{(ppl / base['perplexity/test'] - 1) * 100:+.1f}%" if variant != "base" and ppl and \
            base.get("perplexity/test") else ""
        rouge_delta = f"{rouge - base['rougeL/test']:+.3f}" if variant != "base" and rouge is not None and \
            base.get("rougeL/test") is not None else ""
        table.add_row(variant, _num(ppl, 4), ppl_delta, _num(rouge, 3), rouge_delta,
                      _num(m.get("preference_accuracy/test"), 3))
    return table


def promotion_lines(decision: PromotionResult) -> str:
    against = {"base": "this run's base", "last_promoted": f"the last promoted run {str(decision.baseline_run_id)[:8]}"}
    baseline = against.get(decision.baseline_kind, "no baseline (first run)")
    if decision.promoted:
        checks = "; ".join(f"{c['check']} {_num(c['candidate'], 4)} (limit {_num(c['limit'], 4)})"
                           for c in decision.checks)
        return f"[bold green]Promoted[/] {decision.variant} against {baseline}" + (f": {checks}" if checks else "")
    return f"[bold red]Not promoted[/] {decision.variant} against {baseline}: " + "; ".join(decision.reasons)
