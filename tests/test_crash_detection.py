"""A flow run whose process is SIGKILLed is marked Crashed by the server (heartbeats + the crash-detection
automation of flows/crash_detection.py), instead of staying Running forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from flows.crash_detection import ensure_crash_detection

LONG_FLOW = """
import sys, time
from prefect import flow

@flow(name=sys.argv[1])
def long_running():
    time.sleep(600)

long_running()
"""


def _runs(flow_name: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


@pytest.mark.slow
def test_a_killed_flow_run_is_marked_crashed():
    flow_name = f"killed-{uuid.uuid4().hex[:8]}"
    # This test's flow only, with a short window: the session server's other runs keep Prefect's default period.
    ensure_crash_detection(within_s=45, flow_name=flow_name, name=f"crash detection for {flow_name}")
    proc = subprocess.Popen([sys.executable, "-c", LONG_FLOW, flow_name], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not [r for r in _runs(flow_name) if r.state and r.state.is_running()]:
            assert proc.poll() is None and time.monotonic() < deadline, "the flow run never started"
            time.sleep(1)
        time.sleep(5)  # its first heartbeat goes out as it starts running
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 180
    while True:
        [run] = _runs(flow_name)
        if run.state.is_final() or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run.state.type.value == "CRASHED", run.state
    assert "no heartbeat" in (run.state.message or "")
