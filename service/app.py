"""The FastAPI application."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.auth import ApiKeyMiddleware, load_keys
from service.body_limit import BodyLimitMiddleware
from service.cross_site import CrossSiteMiddleware
from service.embedded_redis import EmbeddedRedis
from service.errors import short_detail, short_errors
from service.fleet import live_inference_workers, live_job_workers, resident_models, worker_capacities
from service.profiling import drain_profile_requests
from service.queue import TooManyJobs
from service.redis_client import connect, connect_async
from service.routes import console, files, fine_tuning, generate, jobs, models, openai
from service.schemas import Health
from service.security_headers import SecurityHeadersMiddleware
from service.unicode_guard import UnicodeGuardMiddleware
from workers.settings import Settings, get_settings
from workers.store.consistency import reconcile_at_start
from workers.templates.renderer import renderer as template_renderer

log = logging.getLogger("strata")


def create_app(
    settings: Settings | None = None, expected: tuple[int, int] = (0, 0), bound: bool = False
) -> FastAPI:
    """The API. `expected`: the (job, inference) workers that must be alive for /health to say ok
    (`strata serve` passes what it supervises; an API-only deployment expects none). `bound`: the app is
    served on `settings.host` (`strata serve`), so a request's Host must name it (service/cross_site.py)."""
    settings = settings or get_settings()
    keys = load_keys(settings.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        embedded = None
        url = settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(settings.home)
            url = embedded.start()
            log.info("embedded redis at %s", url)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        app.state.settings = settings
        app.state.redis = connect(url)
        app.state.aredis = connect_async(url)
        await asyncio.to_thread(reconcile_at_start, app.state.redis, settings.models_dir)
        profiling = asyncio.create_task(drain_profile_requests(app.state.redis, settings))
        threading.Thread(target=template_renderer().warm, name="template-sandbox", daemon=True).start()
        try:
            yield
        finally:
            profiling.cancel()
            app.state.redis.close()
            await app.state.aredis.aclose()
            if embedded:
                embedded.stop()

    app = FastAPIOffline(  # /docs and /redoc load their scripts from this server, not a CDN
        title="Strata",
        version="0.1.0",
        description="Merge, prune and serve homologous LLMs.",
        lifespan=lifespan,
    )
    app.add_middleware(UnicodeGuardMiddleware)  # inside the body limit: it reads bodies under it only
    uploads = (settings.max_file_bytes + files.UPLOAD_SLACK, "STRATA_MAX_FILE_BYTES")
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, path_limits={"/v1/files": uploads}
    )
    app.add_middleware(
        CrossSiteMiddleware,
        bound_host=settings.host if bound else None,
        allowed_hosts=settings.allowed_hosts,
        enabled=not keys,
    )
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: on every response, errors included
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    console.mount(app)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"Redis is unavailable ({type(exc).__name__}); retry shortly"},  # no socket path
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": short_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(
            {"detail": short_detail(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(TooManyJobs)
    async def too_many_jobs(request: Request, exc: TooManyJobs) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "30"})

    @app.get(
        "/health",
        response_model=Health,
        tags=["health"],
        responses={503: {"model": Health, "description": "Redis or an expected worker is down"}},
    )
    def health(request: Request) -> JSONResponse:
        """Redis reachable and the live workers (dead processes are not counted); 503 when degraded."""
        try:
            request.app.state.redis.ping()
            workers = len(live_job_workers(request.app.state.redis))
            inference_ids = live_inference_workers(request.app.state.redis)
        except (RedisConnectionError, RedisTimeoutError):
            report = Health(status="degraded", redis=False, workers=0)
        else:
            ok = workers >= expected[0] and len(inference_ids) >= expected[1]
            resident = resident_models(request.app.state.redis)
            report = Health(
                status="ok" if ok else "degraded",
                redis=True,
                workers=workers,
                inference_workers=len(inference_ids),
                resident=resident,
                capacity=worker_capacities(request.app.state.redis, inference_ids),
            )
            metrics.observe_residency(resident)
        return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format: TTFT, inter-token, end-to-end and queue latency, depth, budget outcomes,
        and the variants each inference worker holds over each base."""
        try:
            metrics.observe_residency(resident_models(request.app.state.redis))
        except (RedisConnectionError, RedisTimeoutError):
            pass
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
