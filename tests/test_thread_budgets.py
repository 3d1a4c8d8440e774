"""Thread budgets: co-located workers split the cores, and `strata serve` starts each with its budget."""

from __future__ import annotations

import psutil
import pytest

from tests.conftest import start_server, stop_server
from tests.tiny_models import make_tiny_chat_llama
from workers.threads import borrowable, default_budgets, worker_environment


@pytest.mark.parametrize(
    "jobs, infer, cores, expected",
    [
        (1, 1, 2, (1, 1)),
        (1, 1, 16, (8, 8)),
        (2, 1, 16, (4, 8)),
        (1, 2, 16, (8, 4)),
        (1, 0, 4, (4, 0)),
        (0, 1, 4, (0, 4)),
        (3, 3, 2, (1, 1)),  # more workers than cores: one thread each, never zero
    ],
)
def test_default_budgets_split_the_cores(jobs, infer, cores, expected):
    assert default_budgets(jobs, infer, cores) == expected


def test_worker_environment_holds_every_runtime_to_the_budget_and_spins_only_briefly():
    env = worker_environment(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["STRATA_THREADS"] == "3"
    assert env["GOMP_SPINCOUNT"] == "20000" and "OMP_WAIT_POLICY" not in env
    assert env["STRATA_BORROW_THREADS"] == "0" and "STRATA_INFER_THREADS" not in env
    assert worker_environment(1, 1, 2)["STRATA_BORROW_THREADS"] == "1"
    with pytest.raises(ValueError):
        worker_environment(0)


def test_serve_starts_workers_with_their_budgets_and_int8_engines(tmp_path, isolated_redis_url):
    home = tmp_path / "home"
    env = {"REDIS_URL": isolated_redis_url, "STRATA_INFER_PRECISION": "int8", "STRATA_JOB_THREADS": "2"}
    server = start_server(home, {**env, "STRATA_INFER_THREADS": "1"})
    try:
        children = psutil.Process(server.process.pid).children()
        roles = {}
        for child in children:
            role = " ".join(child.cmdline()[3:])
            roles[role] = child.environ()
        assert (
            roles["worker --queue user"]["OMP_NUM_THREADS"] == "2"
            and roles["infer"]["OMP_NUM_THREADS"] == "1"
        )
        assert roles["worker --queue background"]["OMP_NUM_THREADS"] == "1"  # and niced
        assert roles["worker --queue user"]["GOMP_SPINCOUNT"] == roles["infer"]["GOMP_SPINCOUNT"] == "20000"
        # the user job worker may borrow the inference thread within the cores; profiles time latency at 1
        assert roles["worker --queue user"]["STRATA_BORROW_THREADS"] == str(borrowable(2, 1, 1))
        assert roles["worker --queue background"]["STRATA_BORROW_THREADS"] == "0"
        assert roles["worker --queue user"]["STRATA_INFER_THREADS"] == "1"
        assert roles["worker --queue background"]["STRATA_INFER_THREADS"] == "1"
        make_tiny_chat_llama(tmp_path / "chatty", seed=11)
        with server.client() as c:
            imported = c.post("/v1/models/import", json={"id": "chatty", "path": str(tmp_path / "chatty")})
            assert imported.status_code == 201, imported.text
            r = c.post("/v1/generate", json={"model": "chatty", "prompt": "the cat", "max_new_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["strata"]["precision"] == "int8"
            assert r.json()["strata"]["exit_adapter"] is False
    finally:
        stop_server(server)
