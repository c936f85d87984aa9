"""Run a command as a process group that dies with the process that started it.

    python parent_watchdog.py PARENT_PID GRACE_S -- command ...

Started as the leader of a new session (Popen(start_new_session=True)), it starts the command in that session's
process group and polls its own parent. When the parent is gone (SIGKILLed, OOM-killed: nothing of it could clean up), it sends
SIGTERM to the whole group, then SIGKILL to whatever is left after GRACE_S, itself included. A plain stop by the
parent (killpg of the group) reaches the command directly; the watchdog then exits with the command's status.

PR_SET_PDEATHSIG alone would not do: it fires when the parent *thread* that forked ends (Prefect runs tasks in
worker threads) and covers only the direct child, not the workers vLLM starts. Standalone (no imports from the
project), so any Python can run it in isolated mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2


def group_members(pgid: int) -> list[int]:
    """Running processes of group pgid other than this one (zombies hold nothing)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def main(argv: list[str]) -> int:
    parent, grace_s, sep, cmd = int(argv[0]), float(argv[1]), argv[2], argv[3:]
    if sep != "--" or not cmd:
        sys.exit("usage: parent_watchdog.py PARENT_PID GRACE_S -- command ...")
    child = subprocess.Popen(cmd)
    # The group's SIGTERM from the parent's stop reaches the command itself; here it must not end the watchdog
    # before the command has exited.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    while True:
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if os.getppid() != parent:
            break
        time.sleep(POLL_S)
    pgid = os.getpgid(0)
    print(f"parent_watchdog: parent {parent} is gone; stopping process group {pgid}", file=sys.stderr, flush=True)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_members(pgid):
        child.poll()  # reap the command so it does not linger as a zombie
        time.sleep(POLL_S)
    os.killpg(pgid, signal.SIGKILL)  # whatever is left, this process last
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
