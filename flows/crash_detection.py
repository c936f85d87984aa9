"""Flow runs whose process died (SIGKILL, OOM kill, a lost machine) are marked Crashed instead of staying Running.

Prefect's own mechanism: every flow run's engine sends a `prefect.flow-run.heartbeat` event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (default 180); an automation on the server moves a run that sent one
and then neither another heartbeat nor a final state within three periods to Crashed. Create it once per Prefect
server (idempotent, by name):

    .venv/bin/python -m flows.crash_detection
"""

from __future__ import annotations

import sys
from datetime import timedelta

AUTOMATION_NAME = "sftpipe: crashed flow runs"
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed")


def crash_detection(within_s: float | None = None, flow_name: str | None = None, name: str = AUTOMATION_NAME):
    """The automation (not yet created). within_s: silence after which a run counts as dead, default three
    heartbeat periods; flow_name: only runs of that flow (default: every flow run)."""
    from prefect.automations import Automation, ChangeFlowRunState
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import get_current_settings

    if within_s is None:
        within_s = 3 * (get_current_settings().flows.heartbeat_frequency or 180)
    related = {"prefect.resource.role": "flow", "prefect.resource.name": flow_name} if flow_name else {}
    return Automation(
        name=name,
        description="A flow run that stopped sending heartbeats without reaching a final state: its process died.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(related),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:.0f} s: the flow run's process died")],
    )


def ensure_crash_detection(**kwargs) -> str:
    """Create the automation on the current Prefect server unless one of that name exists; returns its id."""
    from prefect.client.orchestration import get_client

    automation = crash_detection(**kwargs)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name=automation.name)
    if existing:
        return str(existing[0].id)
    return str(automation.create().id)


if __name__ == "__main__":
    print(f"automation {AUTOMATION_NAME!r}: {ensure_crash_detection()}")
    sys.exit(0)
