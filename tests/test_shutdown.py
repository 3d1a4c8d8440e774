"""Ctrl-C on `make serve` stops it cleanly: the terminal sends SIGINT to the whole process group (the
embedded redis-server has a session of its own and is stopped last), and no worker may print a traceback
because Redis went away under it, idle or in the middle of a job (real processes, real embedded Redis)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import psutil

from tests.conftest import Server, start_server, stop_server


def _signal_group(root: psutil.Process, sig: int) -> list[psutil.Process]:
    """Send `sig` to the process and all its descendants at once, as a terminal does to its foreground
    process group; the processes signalled."""
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return processes


def _stops_cleanly(server: Server, signal_it: Callable[[], list[psutil.Process]]) -> None:
    """Signal the server's processes (`signal_it`: those signalled); all of them end, and the log shows no
    traceback and no restart (exits during a stop are not failures to restart)."""
    try:
        processes = signal_it()
        server.process.wait(timeout=90)
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if server.process.poll() is None:
            stop_server(server)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "restarting" not in log, log[-4000:]


def test_ctrl_c_to_the_process_group_stops_serve_without_tracebacks(tmp_path):
    # embedded Redis (REDIS_URL unset), one job worker and one inference worker
    server = start_server(tmp_path / "home", {"REDIS_URL": None}, workers=1, infer_workers=1)
    time.sleep(2)  # the inference worker is blocked waiting on Redis, as when idle

    def ctrl_c() -> list[psutil.Process]:
        processes = _signal_group(psutil.Process(server.process.pid), signal.SIGINT)
        assert len(processes) >= 4, [p.pid for p in processes]  # serve, redis-server, worker, infer
        return processes

    _stops_cleanly(server, ctrl_c)


def test_ctrl_c_to_the_terminal_group_during_a_job_stops_everything_without_tracebacks(tmp_path):
    server = start_server(
        tmp_path / "home", {"REDIS_URL": None}, workers=1, infer_workers=0, new_session=True
    )
    server.start_slow_job(tmp_path / "big", "v")

    def ctrl_c() -> list[psutil.Process]:
        root = psutil.Process(server.process.pid)
        processes = [root, *root.children(recursive=True)]
        os.killpg(server.process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        return processes

    _stops_cleanly(server, ctrl_c)
