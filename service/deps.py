"""FastAPI dependencies: the shared Redis-backed objects held on app.state."""

from __future__ import annotations

from fastapi import HTTPException, Request
from redis import Redis

from service.queue import JobQueue
from workers.settings import Settings
from workers.store.model_store import ModelStore, StoreError
from workers.store.registry import Registry


def settings(request: Request) -> Settings:
    return request.app.state.settings


def redis(request: Request) -> Redis:
    return request.app.state.redis


def registry(request: Request) -> Registry:
    return Registry(request.app.state.redis)


def store(request: Request) -> ModelStore:
    try:
        return ModelStore(request.app.state.settings.models_dir)
    except StoreError as e:  # its message names no path
        raise HTTPException(503, e.strerror) from e


def job_queue(request: Request) -> JobQueue:
    return JobQueue(request.app.state.redis, request.app.state.settings)
