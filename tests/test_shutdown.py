"""Ctrl-C on `make serve` stops it cleanly: the terminal sends SIGINT to the whole process group (the
embedded redis-server has a session of its own and is stopped last), and no worker may print a traceback
because Redis went away under it, idle or in the middle of a job (real processes, real embedded Redis)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil

from tests.conftest import start_server, stop_server
from tests.tiny_models import make_slow_llama


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


def test_ctrl_c_to_the_terminal_group_during_a_job_stops_everything_without_tracebacks(tmp_path):
    home = tmp_path / "home"
    server = start_server(home, {"REDIS_URL": None}, workers=1, infer_workers=0, new_session=True)
    try:
        big = tmp_path / "big"
        make_slow_llama(big)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.post("/v1/models/import", json={"id": "big", "path": str(big)}).status_code == 201
            job = c.post("/v1/jobs", json={"kind": "variants", "base": "big", "count": 16, "prefix": "v"})
            job_id = job.json()["id"]
            for _ in range(600):
                if c.get(f"/v1/jobs/{job_id}").json()["status"] == "started":
                    break
                time.sleep(0.05)
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "started"
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(True)]
        os.killpg(server.process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        server.process.wait(timeout=90)
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if server.process.poll() is None:
            stop_server(server)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "restarting" not in log, log[-4000:]
