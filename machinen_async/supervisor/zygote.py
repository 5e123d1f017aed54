"""``python -m machinen_async.supervisor.zygote``: start many supervisors from one warm interpreter.

A fork of N siblings would otherwise start N Python interpreters that each
import the same modules (~0.1 s of CPU apiece, a quarter of a sibling's
cost under TCG).  The zygote imports the supervisor once, then forks one
child per sibling -- safe here: no threads and no event loop exist yet.

Stdin: a JSON list of ``[config_json, lifeline_fd, status_fd, stderr_fd]``
(the fds inherited from the launcher).  Each child becomes a session leader
with those fds as its stdin/stdout/stderr, exactly as if the launcher had
spawned ``python -m machinen_async.supervisor``.  Stdout: a JSON list of
the children's pids.
"""

from __future__ import annotations

import json
import os
import sys

from .main import run


def _become_supervisor(config_json: str, lifeline: int, status: int, stderr: int) -> None:
    code = 1
    try:
        os.setsid()
        for fd, target in ((lifeline, 0), (status, 1), (stderr, 2)):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)
        code = run(config_json)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def main() -> None:
    jobs = json.load(sys.stdin)
    pids = []
    for config_json, lifeline, status, stderr in jobs:
        pid = os.fork()
        if pid == 0:
            _become_supervisor(config_json, lifeline, status, stderr)
        pids.append(pid)
    for _, *fds in jobs:
        for fd in fds:
            os.close(fd)
    print(json.dumps(pids), flush=True)


if __name__ == "__main__":
    main()
