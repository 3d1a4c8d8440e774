"""Keep the processes `strata serve` runs alive: the embedded redis-server, job workers, inference workers.

A thread checks them every CHECK_S; one that has exited is started again at once, or after a short
back-off (at most MAX_BACKOFF_S) when it keeps dying within seconds of starting, so a dead worker or
Redis is back within 10 s. Redis comes back first (from its append-only file), then the workers.

A worker that runs but has stopped beating (workers.liveness: no heartbeat for HUNG_AFTER_S, or none
within STARTUP_S of its start; stopped with SIGSTOP, frozen) is hung: it is killed, the job it was running
is failed with a one-line reason, and it is started again like one that died. Hangs are judged only while
Redis has answered for HUNG_AFTER_S: during an outage nobody can beat.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import RedisError

from service.embedded_redis import EmbeddedRedis
from workers.jobs.recovery import fail_jobs_of
from workers.liveness import forget, heartbeats, member
from workers.processes import die_with_parent, kill_tree

log = logging.getLogger("strata.supervisor")
CHECK_S = 0.5
MAX_BACKOFF_S = 4.0
HEALTHY_AFTER_S = 10.0  # a process that ran this long and then died is restarted without delay
HUNG_AFTER_S = 20.0  # a worker silent this long is hung (it beats every second)
STARTUP_S = 120.0  # a worker must have beaten once within this long of its start


@dataclass
class Child:
    command: str  # a `strata` subcommand and its options: "worker --queue user", "infer"
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # consecutive quick deaths
    restart_at: float = field(default=0.0)


class Supervisor:
    def __init__(
        self,
        commands: list[str],
        env: dict[str, str],
        embedded: EmbeddedRedis | None = None,
        command_env: dict[str, dict[str, str]] | None = None,
    ):
        self.children = [Child(command) for command in commands]
        self.env = env
        self.command_env = command_env or {}  # per subcommand, on top of env (its thread budget)
        self.embedded = embedded
        self.restarts = 0
        url = env.get("REDIS_URL")
        self._redis = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) if url else None
        self._redis_up_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="strata-supervisor", daemon=True)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._thread.start()

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *child.command.split()],
            env={**self.env, **self.command_env.get(child.command, {})},
            preexec_fn=die_with_parent,
        )
        child.started = time.monotonic()

    def _backoff(self, failures: int) -> float:
        return 0.0 if failures <= 1 else min(MAX_BACKOFF_S, 0.5 * 2 ** (failures - 2))

    def halt(self) -> None:
        """Restart nothing from now on: a stop is under way (Ctrl-C reaches the workers at the same moment
        as `strata serve`, and their exits are not failures). `stop()` then ends the children."""
        self._stop.set()

    def check(self) -> None:
        """One round: restart Redis if it died, then every child that has exited (none once halted)."""
        if self._stop.is_set():
            return
        now = time.monotonic()
        if self.embedded is not None and self.embedded.process is not None:
            code = self.embedded.process.poll()
            if code is not None:
                log.warning("embedded redis-server exited (code %s): restarting it", code)
                try:
                    self.embedded.start()
                    self.restarts += 1
                except RuntimeError as e:
                    log.error("embedded redis-server did not restart: %s", e)
        self._replace_hung(now)
        for child in self.children:
            code = child.process.poll() if child.process is not None else 0
            if code is None:
                continue
            if child.restart_at == 0.0:  # just noticed
                quick = now - child.started < HEALTHY_AFTER_S
                child.failures = child.failures + 1 if quick else 1
                child.restart_at = now + self._backoff(child.failures)
                log.warning(
                    "%s process %s exited (code %s): restarting it", child.command, child.process.pid, code
                )
            if now >= child.restart_at:
                child.restart_at = 0.0
                self._spawn(child)
                self.restarts += 1

    def _replace_hung(self, now: float) -> None:
        """Kill the running children that stopped beating, and fail the jobs they ran; the round's restart
        pass then starts them again."""
        if self._redis is None:
            return
        try:
            beats = heartbeats(self._redis)
        except RedisError:
            self._redis_up_since = None
            return
        if self._redis_up_since is None:
            self._redis_up_since = now
        if now - self._redis_up_since < HUNG_AFTER_S:
            return
        for child in self.children:
            process = child.process
            if process is None or process.poll() is not None:
                continue
            beat = beats.get(member(process.pid))
            if beat is not None:
                silent = time.time() - beat
                if silent < HUNG_AFTER_S:
                    continue
                reason = f"no heartbeat for {silent:.0f} s"
            elif now - max(child.started, self._redis_up_since) >= STARTUP_S:
                reason = f"no heartbeat within {STARTUP_S:.0f} s of its start"
            else:
                continue
            log.warning(
                "%s process %s is hung (%s): killing and replacing it", child.command, process.pid, reason
            )
            kill_tree(process.pid)
            process.wait()
            try:
                forget(self._redis, process.pid)
                failed = fail_jobs_of(
                    self._redis,
                    process.pid,
                    f"the job worker stopped responding ({reason}) and was replaced; nothing was registered",
                )
            except RedisError as e:
                log.warning("could not fail the jobs of hung process %s: %s", process.pid, e)
            else:
                for job_id in failed:
                    log.warning("job %s was running on hung process %s: marked failed", job_id, process.pid)

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_S):
            try:
                self.check()
            except Exception:  # the supervisor itself must not die
                log.exception("supervisor round failed")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop watching, then terminate every child (killed if it does not exit in time)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        running = [c.process for c in self.children if c.process is not None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
