"""Multi-process training: a stage relaunches its own module under accelerate or torchrun, and resumes from checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tasks.core.config import PipelineConfig
from tasks.core.storage import write_jsonl

log = logging.getLogger("sftpipe.train")


def launch_command(launcher: str, num_processes: int, module: str, job: Path,
                   accelerate_config: str | None = None) -> list[str]:
    """`accelerate launch --multi_gpu` (or with the user's accelerate config file) or `torchrun` over N processes
    (gloo on CPU, nccl on GPUs). Whether they replicate or shard the model is the trainer's setting, not the
    launcher's."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(num_processes), "-m", module, "--job", str(job)]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        return [*accelerate, "--config_file", accelerate_config, "--num_processes", str(num_processes),
                "-m", module, "--job", str(job)]
    # Port 0: torch's rendezvous takes a free port itself. accelerate's default (29500, checked, then bound) races
    # when two trainings start at once on one machine (two work-pool jobs, a test beside a nightly run).
    return [*accelerate, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", module, "--job", str(job)]


def run_launched(cmd: list[str], log_path: Path) -> None:
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                           os.environ.get("PYTHONPATH", "")]))
    log.info("launching: %s", " ".join(cmd))
    with log_path.open("a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"launched training exited with {proc.returncode}; last lines of {log_path}:\n{tail}")


def train_in_processes(cfg: PipelineConfig, stage_cfg, module: str, out_dir: Path, train: list[dict],
                       valid: list[dict], **job: Any) -> dict:
    """Run `python -m module --job <out_dir>/job.json` in stage_cfg.num_processes processes (stage_cfg.launcher).
    The examples and the job file (config, paths, `job`) go to out_dir; returns the train.json the main process writes there."""
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "validation.jsonl", valid)
    job = {"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "train": str(out_dir / "train.jsonl"),
           "validation": str(out_dir / "validation.jsonl"), **job}
    (out_dir / "job.json").write_text(json.dumps(job, indent=2))
    run_launched(launch_command(stage_cfg.launcher, stage_cfg.num_processes, module, out_dir / "job.json",
                                stage_cfg.accelerate_config), out_dir / "launch.log")
    return json.loads((out_dir / "train.json").read_text())



def launched_job(argv: list[str] | None, description: str) -> tuple[dict, PipelineConfig]:
    """In a process started by accelerate launch / torchrun: the job file the stage wrote, and its config."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="job.json written by the stage")
    job = json.loads(Path(parser.parse_args(argv).job).read_text())
    die_with_launcher()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return job, PipelineConfig.model_validate(job["config"])


def end_process_group() -> None:
    """Tear down the process group before the interpreter exits. Left to finalization, gloo's worker threads can
    still hold tensors then, and a rank now and then aborts on exit ("terminate called without an active
    exception", SIGABRT) after training finished, which fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def die_with_launcher() -> None:
    """torchrun starts each rank in its own session, so killing the stage (a lost worker, a Prefect cancel) would
    leave the ranks training on and writing checkpoints under the retry's feet. On Linux, have the kernel kill this
    rank when its launcher goes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher died before the request was in place
        os._exit(1)


def last_checkpoint(folder: Path) -> tuple[str | None, int | None]:
    """The newest complete checkpoint (trainer_state.json is written last); a half-written one is removed."""
    complete = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if (path / "trainer_state.json").is_file():
            complete.append((int(path.name.rsplit("-", 1)[1]), path))
        else:
            log.warning("removing incomplete checkpoint %s (killed while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    if not complete:
        return None, None
    step, path = max(complete)
    return str(path), step
