"""The `strata` command: run the service and its workers, and talk to a running server."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from workers.liveness import start_heartbeat
from workers.threads import apply_budget, borrowable, default_budgets, worker_environment

app = typer.Typer(help="Strata: merge, prune and serve homologous LLMs.", no_args_is_help=True)
console = Console(stderr=True)
ServerOpt = Annotated[
    str, typer.Option("--server", envvar="STRATA_SERVER", help="URL of a running Strata server")
]
DEFAULT_SERVER = "http://127.0.0.1:8000"


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default STRATA_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default STRATA_PORT)")] = None,
    workers: Annotated[int | None, typer.Option(help="Job workers to start (default STRATA_WORKERS)")] = None,
    infer_workers: Annotated[
        int | None, typer.Option(help="Inference workers to start (default STRATA_INFER_WORKERS)")
    ] = None,
    default_model: Annotated[
        bool | None, typer.Option(help="Import the default model at first start")
    ] = None,
) -> None:
    """Start the API, its job workers, and (when REDIS_URL is unset) an embedded Redis."""
    import uvicorn

    from service.app import create_app
    from service.auth import ApiKeysError, load_keys
    from service.default_model import ensure_default_model
    from service.embedded_redis import EmbeddedRedis
    from service.redis_client import connect
    from service.supervisor import Supervisor
    from workers.settings import Settings
    from workers.store.model_store import ModelStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {
        k: v
        for k, v in dict(
            host=host, port=port, workers=workers, infer_workers=infer_workers, default_model=default_model
        ).items()
        if v is not None
    }
    settings = Settings(**overrides)
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        keys = load_keys(settings.api_keys)
    except ApiKeysError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    if not keys:
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]refusing to bind {settings.host} without API keys[/yellow]")
        settings.host = "127.0.0.1"
        console.print("no API keys configured (STRATA_API_KEYS): serving on 127.0.0.1 only")
    embedded = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(settings.home)
        settings.redis_url = embedded.start()
        console.print(f"embedded Redis: {settings.redis_url} (data in {settings.home / 'redis'})")
    removed = ModelStore(settings.models_dir).clean_stale_staging()
    if removed:
        console.print(f"removed {len(removed)} unfinished model directories left by a previous run")
    supervisor = None
    try:
        if settings.default_model:
            try:
                record = ensure_default_model(connect(settings.redis_url), settings)
                console.print(f"default model: {record.id} ({record.num_parameters:,} parameters)")
            except Exception as e:  # the service is still useful without it
                console.print(f"[yellow]default model unavailable: {e}[/yellow]")
        env = {
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "STRATA_HOME": str(settings.home),
            "HF_HUB_OFFLINE": "1",
        }
        job_threads, infer_threads = default_budgets(settings.workers, settings.infer_workers)
        job_threads = settings.job_threads or job_threads
        infer_threads = settings.infer_threads or infer_threads
        # User jobs and background profiles have workers of their own: a user's job never waits behind a
        # profile; the background worker runs niced, on one thread.
        background = ["worker --queue background"] if settings.workers else []
        commands = (
            ["worker --queue user"] * settings.workers + background + ["infer"] * settings.infer_workers
        )
        # the user job workers borrow the inference cores while no request is being generated (one at a
        # time); profiles time latency on as many threads as inference decodes with
        borrow = borrowable(max(1, job_threads), infer_threads, settings.infer_workers)
        borrow = borrow if settings.borrow_idle_cores else 0
        serving = infer_threads or None
        budgets = {
            "worker --queue user": worker_environment(max(1, job_threads), borrow, serving),
            "worker --queue background": worker_environment(1, 0, serving),
            "infer": worker_environment(max(1, infer_threads)),
        }
        supervisor = Supervisor(commands, env, embedded, budgets)  # restarts whichever of them dies
        supervisor.start()
        console.print(
            f"{settings.workers} job worker(s) x {job_threads} thread(s) (+{len(background)} for background "
            f"profiles), {settings.infer_workers} inference worker(s) x {infer_threads} thread(s)"
            f"{' (lent to a job while idle)' if borrow else ''}, supervised; "
            f"API on http://{settings.host}:{settings.port}"
        )
        app_ = create_app(settings, expected=(settings.workers, settings.infer_workers), bound=True)
        server = uvicorn.Server(uvicorn.Config(app_, host=settings.host, port=settings.port))
        # Own the signals: a graceful stop on SIGINT/SIGTERM (nothing restarted from then on: Ctrl-C reaches
        # the workers too; the embedded Redis has a session of its own), then `finally` stops workers, then
        # Redis.
        server.capture_signals = contextlib.nullcontext

        def graceful(*_: object) -> None:
            supervisor.halt()
            server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, graceful)
        server.run()
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded:
            embedded.stop()


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty")] = False,
    queue: Annotated[
        str,
        typer.Option(
            help="Which jobs to take: user (the API's jobs), background (profiles nobody waits for), or all "
            "(user jobs first); `strata serve` runs user workers and one background worker"
        ),
    ] = "all",
) -> None:
    """Run a job worker against REDIS_URL (or the embedded Redis of STRATA_HOME)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from rq import Queue

    from workers.jobs.errors import record_error
    from workers.jobs.queues import WORKER_QUEUES

    if queue not in WORKER_QUEUES:
        _error(f"--queue must be one of {', '.join(WORKER_QUEUES)}, not {queue!r}")
        raise typer.Exit(2)
    if queue == "background":
        os.nice(10)  # what is left of the CPU; each job imports what it needs in its work-horse
    else:
        import workers.jobs.extract_lora  # noqa: F401  (import torch & co once, before forking work-horses)
        import workers.jobs.grow  # noqa: F401
        import workers.jobs.materialise  # noqa: F401
        import workers.jobs.merge  # noqa: F401
        import workers.jobs.profile  # noqa: F401
        import workers.jobs.prune  # noqa: F401
        import workers.jobs.sort  # noqa: F401
        import workers.jobs.sparsify  # noqa: F401
        import workers.jobs.truncate  # noqa: F401
        import workers.jobs.variants  # noqa: F401
    from workers.jobs.recovery import reap_abandoned
    from workers.jobs.worker import StrataWorker
    from workers.settings import get_settings
    from workers.store.model_store import ModelStore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = get_settings()
    if queue != "background":  # the background worker keeps the one thread `strata serve` gives it
        apply_budget(settings.job_threads)
    ModelStore(settings.models_dir).clean_stale_staging()
    conn = _worker_redis(settings)
    start_heartbeat(_worker_redis(settings))  # a client of its own: work-horses fork with `conn`'s pool
    try:
        names = WORKER_QUEUES[queue]
        for name in names:
            for job_id in reap_abandoned(conn, name):
                console.print(f"job {job_id} was running on a worker that died: marked failed")
        queues = [Queue(name, connection=conn) for name in names]  # in priority order
        StrataWorker(queues, connection=conn, exception_handlers=[record_error]).work(
            burst=burst, logging_level="INFO"
        )
    except RedisConnectionError as e:  # Redis went away (Ctrl-C stops it with us): one line, no traceback
        _error(f"job worker stopping: Redis is gone ({str(e).splitlines()[0][:200]})")
        raise typer.Exit(1) from None


@app.command()
def infer(
    max_batch_size: Annotated[int, typer.Option(help="Requests generated together")] = 8,
    max_models: Annotated[
        int,
        typer.Option(
            help="Bases (and plain models) kept loaded, least recently used dropped beyond; the API "
            "routes each request to a worker that holds its base"
        ),
    ] = 2,
) -> None:
    """Run a long-lived inference worker: keeps models loaded, generates at per-request exit depths."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from workers.inference.worker import InferenceWorker
    from workers.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = get_settings()
    start_heartbeat(_worker_redis(settings))
    apply_budget(settings.infer_threads)
    worker_ = InferenceWorker(
        _worker_redis(settings), settings.models_dir, max_batch_size, max_models, settings.infer_precision
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker_.stopping.set())
    try:
        worker_.run()
    except RedisConnectionError:
        # Ctrl-C reaches the whole process group: the embedded Redis may close the worker's connection
        # just before the worker's own signal arrives. Stopping then is a clean exit, not a traceback.
        if not worker_.stopping.wait(2.0):
            raise


def _worker_redis(settings):
    """REDIS_URL, or the embedded Redis that `strata serve` runs for this STRATA_HOME."""
    from redis import Redis

    from service.embedded_redis import EmbeddedRedis

    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.home)
        if not embedded.socket.exists():
            console.print(
                "[red]REDIS_URL is unset and no embedded Redis runs for this STRATA_HOME; "
                "start `strata serve` first or set REDIS_URL[/red]"
            )
            raise typer.Exit(2)
        url = embedded.url
    return Redis.from_url(url)


@contextlib.contextmanager
def _server(url: str, timeout: float = 60) -> Iterator[httpx.Client]:
    """A client of a running server; one that cannot be reached is a one-line error, not a traceback."""
    try:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            yield client
    except httpx.TransportError as e:
        _error(f"cannot reach a Strata server at {url} ({type(e).__name__}); is `strata serve` running?")
        raise typer.Exit(1) from None


def _fail(response: httpx.Response) -> None:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if not isinstance(detail, str):
        detail = json.dumps(detail, indent=2)
    console.print(f"[red]{response.status_code}: {detail}[/red]")
    raise typer.Exit(1)


def watch(client: httpx.Client, job_id: str) -> dict:
    """Show a progress bar until the job ends; return its final view."""
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=1.0)
        while True:
            view = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            bar.update(
                task,
                completed=view["progress"],
                description=f"job {job_id[:8]} {view['status']}: {view.get('message') or ''}",
            )
            if view["status"] in ("finished", "failed", "canceled"):
                return view
            time.sleep(0.5)


def _report(client: httpx.Client, view: dict, wait: bool) -> None:
    if not wait:
        print(json.dumps(view, indent=2))
        return
    final = watch(client, view["id"])
    print(json.dumps(final, indent=2))
    if final["status"] != "finished":
        raise typer.Exit(1)


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A mergekit YAML or a job YAML/JSON")
    ],
    wait: Annotated[bool, typer.Option(help="Show progress until the job ends")] = False,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Submit a job to a running server: a mergekit YAML, or any job spec with a `kind`."""
    text = file.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None  # sent as it is: the server answers with a one-line reason
    with _server(server) as client:
        if isinstance(data, dict) and data.get("kind", "merge") != "merge":
            response = client.post("/v1/jobs", json=data)
        else:
            response = client.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})
        if response.status_code >= 400:
            _fail(response)
        _report(client, response.json(), wait)


@app.command()
def merge(
    config: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="A mergekit YAML (models or slices form) or a mergekit-moe YAML"
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged model (must not exist)")],
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None,
    max_shard_bytes: Annotated[int, typer.Option(help="Largest output shard")] = 2 << 30,
) -> None:
    """Merge locally, without a server (like mergekit-yaml): model references are directories.

    A mergekit-moe YAML (recognised by its keys: `experts`, `gate_mode`, ..., as POST /v1/merges does)
    builds the mixture-of-experts model instead, like mergekit-moe.

    The output is written to `.<out>.partial` beside it and renamed when complete; an interrupted run
    (Ctrl-C, SIGTERM) removes it, and a leftover of a killed run is removed at the next start. Bad input
    gets a one-line error, never a traceback."""
    out_dir = out_dir.expanduser()
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = _merge_locally(config, out_dir, tmp, device, max_shard_bytes)
    except KeyboardInterrupt:
        _error(f"interrupted; removed the partial output {tmp}")
        raise typer.Exit(130) from None
    except LocalMergeError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = f"{result.tensors} tensors, {result.bytes_written:,} bytes"
    console.print(f"{done} in {result.seconds:.2f} s on {result.device}")


def _error(message: str) -> None:
    """One line on stderr, in red, never wrapped, with no markup read from the message."""
    console.print(message, style="red", markup=False, soft_wrap=True, highlight=False)


class LocalMergeError(Exception):
    """A reason, in one line, that `strata merge` could not merge."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _write_locally(paths: dict[str, Path], out_dir: Path, tmp: Path, description: str, build):
    """Check the input directories, run `build(progress)` into the partial directory `tmp` with a progress
    bar, refuse an output with non-finite values, then rename it to `out_dir`. File and device errors
    become one-line LocalMergeErrors; the caller maps its own."""
    from workers.store.model_files import ModelFileError
    from workers.store.references import ModelReferenceError, check_model_directory
    from workers.tensors.finite import first_non_finite

    if out_dir.exists():
        raise LocalMergeError(f"{out_dir} exists")
    if tmp.exists():  # left by a run that was killed: ours by its name, never a finished model
        console.print(f"removing {tmp}, left by an interrupted run")
        shutil.rmtree(tmp)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    try:
        for ref, path in paths.items():
            if not path.is_dir():
                raise LocalMergeError(f"not a model directory: {ref}")
            check_model_directory(path)
        tmp.mkdir(parents=True)
        with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task(description, total=1)

            def progress(done: int, total: int, message: str) -> None:
                bar.update(task, completed=done, total=total, description=message)

            result = build(progress)
        bad = first_non_finite(tmp)
        if bad is not None:
            raise LocalMergeError(f"tensor {bad!r} of the output holds NaN or infinite values; not written")
        tmp.rename(out_dir)
    except (ModelReferenceError, ModelFileError) as e:
        raise LocalMergeError(str(e)) from e
    except OSError as e:
        raise LocalMergeError(f"{e.strerror or 'cannot read or write a file'}: {e.filename or ''}") from e
    except RuntimeError as e:  # torch: e.g. an unknown device, out of memory
        raise LocalMergeError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return result


def _merge_locally(config: Path, out_dir: Path, tmp: Path, device: str | None, max_shard_bytes: int):
    import torch

    from workers.merge.config import MergeConfigError, load_merge_config, parse_yaml
    from workers.merge.executor import MissingParameterError, merge_models
    from workers.merge.homology import HomologyError
    from workers.merge.plan import SliceError
    from workers.moe.config import is_moe_recipe
    from workers.settings import get_settings

    text = config.read_bytes()
    try:
        if is_moe_recipe(parse_yaml(text)):
            return _build_moe_locally(config, text, out_dir, tmp, device, max_shard_bytes)
        recipe = load_merge_config(text)
    except MergeConfigError as e:
        raise LocalMergeError(f"{config}: {e}") from e
    limit = get_settings().max_merge_models
    listed = len(recipe.models or []) + sum(len(s.sources) for s in recipe.slices or [])
    if listed > limit:  # as the API counts them: the slices form lists each slice's sources
        raise LocalMergeError(f"the recipe lists {listed} models; at most {limit}")
    paths = {ref: Path(ref).expanduser() for ref in recipe.input_models}

    def build(progress):
        return merge_models(
            recipe,
            paths,
            tmp,
            device=torch.device(device) if device else None,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )

    try:
        return _write_locally(paths, out_dir, tmp, recipe.merge_method, build)
    except SliceError as e:
        raise LocalMergeError(f"slices do not fit the models: {e}") from e
    except HomologyError as e:
        raise LocalMergeError(f"models are not homologous: {e}") from e
    except MissingParameterError as e:
        raise LocalMergeError(str(e)) from e


def _build_moe_locally(
    config: Path, text: bytes, out_dir: Path, tmp: Path, device: str | None, max_shard_bytes: int
):
    """`strata merge` of a mergekit-moe YAML: the MoE model, written like a merge (partial, then renamed)."""
    import torch

    from workers.merge.config import MergeConfigError
    from workers.merge.homology import HomologyError
    from workers.moe.build import build_moe
    from workers.moe.config import load_moe_config
    from workers.moe.layouts import LayoutError
    from workers.moe.routers import RouterError

    try:
        recipe = load_moe_config(text)
    except MergeConfigError as e:
        raise LocalMergeError(f"{config}: {e}") from e
    paths = {ref: Path(ref).expanduser() for ref in recipe.input_models}

    def build(progress):
        return build_moe(
            recipe,
            paths,
            tmp,
            device=torch.device(device) if device else None,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )

    try:
        result = _write_locally(paths, out_dir, tmp, f"moe ({recipe.gate_mode})", build)
    except HomologyError as e:
        raise LocalMergeError(f"experts are not homologous: {e}") from e
    except (LayoutError, RouterError) as e:
        raise LocalMergeError(str(e)) from e
    console.print(f"{result.architecture} with {result.num_experts} experts per layer")
    return result


@app.command("make-variants")
def make_variants(
    base: Annotated[str, typer.Option(help="The model to derive from")] = "smollm2-135m-instruct",
    count: Annotated[int, typer.Option(help="How many variants")] = 2,
    scale: Annotated[float, typer.Option(help="rms(delta) / rms(weights) per tensor")] = 1e-3,
    rank: Annotated[int | None, typer.Option(help="Low-rank deltas of this rank (dense if unset)")] = None,
    seed: int = 0,
    prefix: Annotated[str | None, typer.Option(help="Output ids are <prefix>-1..count")] = None,
    wait: bool = True,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Derive fine-tune-like variants of a model: random noise deltas that learned nothing, for merge demos
    and synthetic tests (real variants: the finetune job)."""
    body = {
        "kind": "variants",
        "base": base,
        "count": count,
        "scale": scale,
        "rank": rank,
        "seed": seed,
        "prefix": prefix,
    }
    with _server(server) as client:
        response = client.post("/v1/jobs", json={k: v for k, v in body.items() if v is not None})
        if response.status_code >= 400:
            _fail(response)
        _report(client, response.json(), wait)


@app.command()
def models(server: ServerOpt = DEFAULT_SERVER) -> None:
    """List the registered models."""
    with _server(server) as client:
        response = client.get("/v1/models")
        if response.status_code >= 400:
            _fail(response)
        for item in response.json()["data"]:
            r = item["strata"]
            print(
                f"{r['id']:40s} {r['architecture']:20s} layers={r['num_layers']} "
                f"params={r['num_parameters']:,} {r['dtype']} parents={','.join(r['parents']) or '-'}"
            )


if __name__ == "__main__":
    app()
