"""Ctrl-C on `make serve` stops it cleanly: the terminal sends SIGINT to the whole process group, so the
embedded redis-server stops at the same moment as the workers, and no worker may print a traceback
because Redis went away under it (real processes, real embedded Redis)."""

from __future__ import annotations

import signal
import time

import psutil

from tests.conftest import start_server, stop_server


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


def test_ctrl_c_to_the_process_group_stops_serve_without_tracebacks(tmp_path):
    # embedded Redis (REDIS_URL unset), one job worker and one inference worker
    server = start_server(tmp_path / "home", {"REDIS_URL": None}, workers=1, infer_workers=1)
    try:
        time.sleep(2)  # the inference worker is blocked waiting on Redis, as when idle
        processes = _signal_group(psutil.Process(server.process.pid), signal.SIGINT)
        assert len(processes) >= 4, [p.pid for p in processes]  # serve, redis-server, worker, infer
        server.process.wait(timeout=60)
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if server.process.poll() is None:
            stop_server(server)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "restarting" not in log, log[-4000:]  # exits during a stop are not failures to restart
