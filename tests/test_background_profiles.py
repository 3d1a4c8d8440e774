"""Background profiles from the serving side: an unprofiled model gets the conservative default and a
profile job, a drifted latency model gets a re-profile, a fresh one neither."""

from __future__ import annotations

import time

import redis as redis_lib

from service.generation.runner import Generation
from service.profiling import profile_pending
from service.queue import JobQueue
from workers.generation.latency import LatencyProfile, LinearInDepth
from workers.inference.protocol import latency_key
from workers.settings import Settings
from workers.store.registry import ModelRecord


def record() -> ModelRecord:
    return ModelRecord(
        id="m",
        architecture="LlamaForCausalLM",
        num_layers=4,
        num_parameters=10**6,
        dtype="float32",
        size_bytes=1,
    )


def measured(scale: float) -> LatencyProfile:
    linear = LinearInDepth(
        a0_ms=1,
        a1_ms_per_layer=1,
        b0_ms_per_prompt_token=0,
        b1_ms_per_prompt_token_layer=0,
        c0_ms_per_new_token=0,
        c1_ms_per_new_token_layer=1,
    )
    return LatencyProfile(num_layers=4, depths={4: linear.at(4)}, linear=linear, scale=scale)


def profile_jobs(redis, settings) -> list[dict]:
    return [view.spec for view in JobQueue(redis, settings).list() if view.kind == "profile"]


def test_unprofiled_drifted_and_fresh_models(tmp_path, isolated_redis_url):
    settings = Settings(home=tmp_path, redis_url=isolated_redis_url, default_model=False, reprofile_drift=2.0)
    redis = redis_lib.Redis.from_url(isolated_redis_url)
    generation = Generation(redis, None, settings)

    latency, source = generation.latency(record())
    assert source == "default" and latency.linear is not None
    assert profile_pending(redis, "m") and profile_jobs(redis, settings) == [
        {"kind": "profile", "model": "m", "repeats": 2, "if_unprofiled": True}
    ]
    generation.latency(record())  # a second request queues nothing more
    assert len(profile_jobs(redis, settings)) == 1

    redis.delete("strata:profiling:m")
    redis.set(latency_key("m"), measured(scale=1.5).model_dump_json())
    assert generation.latency(record())[1] == "profile"
    assert len(profile_jobs(redis, settings)) == 1  # within the drift factor: no re-profile

    redis.set(latency_key("m"), measured(scale=2.5).model_dump_json())
    assert generation.latency(record())[1] == "profile"
    jobs = profile_jobs(redis, settings)
    assert len(jobs) == 2 and jobs[0]["if_unprofiled"] is False  # newest first: a forced re-profile


def test_background_profiles_never_run_ahead_of_user_jobs(tmp_path, isolated_redis_url):
    """A profile queued at registration goes to the background queue, which a job worker takes from only
    when the user queue is empty: a burst worker runs the user's job first."""
    from rq import Queue, SimpleWorker
    from rq.job import Job

    from service.profiling import request_profile
    from service.queue import BACKGROUND_QUEUE_NAME, QUEUE_NAME, QUEUE_NAMES
    from service.schemas import ProfileJobRequest

    settings = Settings(home=tmp_path, redis_url=isolated_redis_url, default_model=False)
    redis = redis_lib.Redis.from_url(isolated_redis_url)
    background_id = request_profile(redis, settings, "registered")
    user = JobQueue(redis, settings).submit(ProfileJobRequest(kind="profile", model="asked-for"))
    assert Job.fetch(background_id, connection=redis).origin == BACKGROUND_QUEUE_NAME
    assert Job.fetch(user.id, connection=redis).origin == QUEUE_NAME
    assert JobQueue(redis, settings).active("profile") == 2
    order: list[str] = []
    worker = SimpleWorker([Queue(name, connection=redis) for name in QUEUE_NAMES], connection=redis)
    worker.execute_job = lambda job, queue: order.append(job.id)  # record the order, run nothing
    worker.work(burst=True, max_jobs=2)
    assert order == [user.id, background_id]


def test_a_user_job_starts_while_background_work_runs_and_the_profile_still_gets_done(
    tmp_path, isolated_redis_url
):
    """`strata serve` runs background work on a worker of its own: a user's job queued while a background
    job runs starts (and ends) meanwhile, and the profile queued at registration is done afterwards."""
    from rq import Queue
    from rq.command import send_stop_job_command
    from rq.job import Job, JobStatus

    from service.queue import BACKGROUND_QUEUE_NAME
    from tests.conftest import start_server, stop_server
    from tests.tiny_models import make_tiny_chat_llama

    make_tiny_chat_llama(tmp_path / "tiny", seed=0)
    make_coarse_tokenizer_model(tmp_path / "coarse")
    server = start_server(
        tmp_path / "home", {"REDIS_URL": isolated_redis_url, "STRATA_PROFILE_ON_REGISTER": "true"}
    )
    try:
        redis = redis_lib.Redis.from_url(isolated_redis_url)
        blocker = Queue(BACKGROUND_QUEUE_NAME, connection=redis).enqueue("time.sleep", 900, job_timeout=1000)
        for _ in range(2400):  # the background worker may still be starting
            if blocker.get_status() == JobStatus.STARTED:
                break
            time.sleep(0.1)
        assert blocker.get_status() == JobStatus.STARTED, server.log.read_text()[-3000:]
        with server.client() as c:
            r = c.post("/v1/models/import", json={"id": "tiny", "path": str(tmp_path / "tiny")})
            assert r.status_code == 201, r.text
            user = c.post("/v1/jobs", json={"kind": "profile", "model": "tiny", "repeats": 1}).json()
        view = server.wait_job(user["id"], timeout=300)
        assert view["status"] == "finished", view["error"]
        assert blocker.get_status() == JobStatus.STARTED  # the user's job did not wait for it

        send_stop_job_command(redis, blocker.id)
        (background,) = [
            job
            for job in Job.fetch_many(
                [i.decode() for i in redis.zrange("strata:jobs", 0, -1)], connection=redis
            )
            if job is not None and job.origin == BACKGROUND_QUEUE_NAME
        ]
        assert background.meta["kind"] == "profile" and background.args[0]["model"] == "tiny"
        assert server.wait_job(background.id, timeout=300)["status"] == "finished"

        # a model whose tokenizer makes one token of the held-out text: profiled for latency, with the reason
        # its quality was not measured (the job failed with a traceback before)
        with server.client() as c:
            r = c.post("/v1/models/import", json={"id": "coarse", "path": str(tmp_path / "coarse")})
            assert r.status_code == 201, r.text
            for _ in range(600):
                profile = c.get("/v1/models/coarse").json()["strata"].get("profile")
                if profile:
                    break
                time.sleep(0.5)
        assert profile and profile["latency"]["depths"] and profile["quality"] == {}, server.log.read_text()[
            -3000:
        ]
        assert profile["quality_error"].startswith(
            "quality not measured: the model's tokenizer makes 1 token(s)"
        )
    finally:
        stop_server(server)


def test_an_adapter_is_not_queued_for_a_background_profile(tmp_path, isolated_redis_url):
    """extract_lora registers PEFT adapters: no model of their own, so nothing to profile (a profile job
    queued for one failed with "no config.json"); a model is queued."""
    from service.profiling import drain_once
    from workers.store.registry import Registry

    settings = Settings(home=tmp_path, redis_url=isolated_redis_url, default_model=False)
    redis = redis_lib.Redis.from_url(isolated_redis_url)
    registry = Registry(redis)
    model = record()
    adapter = record().model_copy(update={"id": "m-lora", "type": "adapter", "base_model": "m"})
    assert registry.add(model) and registry.add(adapter)
    assert len(drain_once(redis, settings)) == 1
    assert [job["model"] for job in profile_jobs(redis, settings)] == ["m"]


def make_coarse_tokenizer_model(path) -> None:
    """A tiny model whose tokenizer (word-level, no pre-tokenizer) makes one token of any text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import character_vocab, make_tiny_llama

    make_tiny_llama(path, seed=3)
    backend = Tokenizer(models.WordLevel(character_vocab(), unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)
