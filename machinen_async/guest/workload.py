"""The VM's workload: one supervised long-running command."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from ..protocol.guest_abi import IMAGE_CONFIG, WORKLOAD_LOG
from .task import BASE_ENV, IMAGE_DEFAULTS, identity, start_thread

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing into PID 1 (slow under TCG)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..protocol.messages import WorkloadState

WORKLOAD_MAX_BACKOFF_S = 10.0


class Workload:
    """The VM's long-running command (an image's default cmd, or boot(cmd=...)).

    Supervised: output goes to WORKLOAD_LOG; a non-zero exit restarts it
    after a growing pause; a zero exit ends it.
    """

    def __init__(self) -> None:
        self.lock: threading.Lock = threading.Lock()
        self.state: WorkloadState = {"running": False, "argv": None, "pid": None, "exit_code": None, "restarts": 0}

    def start(self, params: Mapping[str, object]) -> WorkloadState:
        spec = params
        if params.get("image_cmd"):  # an OCI image's Entrypoint + Cmd, asked for by boot(cmd="image")
            spec = {"cmd": IMAGE_DEFAULTS["cmd"]}
        elif params.get("from_image"):
            try:
                with open(IMAGE_CONFIG) as f:
                    spec = json.load(f)
            except FileNotFoundError:
                return self.status()
        if not spec.get("cmd"):
            return self.status()
        with self.lock:
            if self.state["argv"] is not None:
                raise RuntimeError("a workload is already running")
            self.state["argv"] = list(spec["cmd"])
        env = dict(BASE_ENV)
        env.update(spec.get("env") or {})
        os.makedirs(os.path.dirname(WORKLOAD_LOG), exist_ok=True)
        started = threading.Event()
        start_thread(self._supervise, spec["cmd"], env, spec.get("cwd") or IMAGE_DEFAULTS["cwd"], started)
        started.wait(5)
        return self.status()

    def _supervise(self, argv: list[str], env: dict[str, str], cwd: str, started: threading.Event) -> None:
        backoff = 0.5
        while True:
            with open(WORKLOAD_LOG, "ab") as log:
                try:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        cwd=cwd, env=env, start_new_session=True, **identity(),
                    )  # fmt: skip
                except (OSError, KeyError) as exc:  # KeyError: the image's User is unknown
                    log.write(f"machinen: cannot start {argv!r}: {exc}\n".encode())
                    with self.lock:
                        self.state.update({"running": False, "exit_code": 127})
                    started.set()
                    return
            with self.lock:
                self.state.update({"running": True, "pid": proc.pid})
            started.set()
            returncode = proc.wait()
            with self.lock:
                self.state.update({"running": False, "exit_code": 128 - returncode if returncode < 0 else returncode})
                if returncode == 0:
                    return
                self.state["restarts"] += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, WORKLOAD_MAX_BACKOFF_S)

    def status(self, params: Mapping[str, object] | None = None) -> WorkloadState:
        with self.lock:
            return self.state.copy()


WORKLOAD = Workload()
