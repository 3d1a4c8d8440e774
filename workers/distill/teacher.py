"""Where the teacher's answers come from, and the cache that keeps them.

A teacher is a `Complete` function: prompts in, continuations out (greedy, stopped at the answer format's
end). Two kinds:

- `engine_teacher`: a registered model run in-process by the dynamic-depth engine at any exit depth. The
  job's worker does not call Strata's own HTTP API: that would need the server's address and an API key
  inside the worker, inference workers to be running (`--infer-workers 0` is a valid deployment), and it
  would count the job's queries against users' rate and queue limits. In-process the job depends on
  nothing but its model files.
- `endpoint_teacher`: an OpenAI-compatible chat-completions endpoint named in the settings
  (STRATA_TEACHER_ENDPOINTS: its URL and key, never from a request), whose host must be on
  STRATA_TEACHER_HOSTS. Each call is retried with exponential backoff; when the retries are spent the job
  fails with the reason and how many answers were cached.

`ask_teacher` asks only for the prompts not in the cache (one JSONL line per answer, keyed by the sha256
of the teacher's identity and the prompt, appended as each batch completes), so a retried job resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from workers.distill.prompts import STOPS
from workers.settings import TeacherEndpoint

Complete = Callable[[list[str]], list[str]]


class TeacherError(RuntimeError):
    """The teacher failed for good; the message says why and what was cached."""


def endpoint_for(
    name: str, endpoints: dict[str, TeacherEndpoint], allowed_hosts: Sequence[str]
) -> TeacherEndpoint:
    """The configured endpoint `name`, if its host is on the allow-list; ValueError otherwise."""
    endpoint = endpoints.get(name)
    if endpoint is None:
        known = ", ".join(sorted(endpoints)) or "none is configured (STRATA_TEACHER_ENDPOINTS)"
        raise ValueError(f"teacher endpoint {name[:60]!r} is not configured; known: {known}")
    host = (urlsplit(endpoint.url).hostname or "").lower()
    if host not in {h.lower() for h in allowed_hosts}:
        raise ValueError(
            f"teacher endpoint {name!r}: host {host!r} is not on the allow-list (STRATA_TEACHER_HOSTS)"
        )
    return endpoint


def endpoint_teacher(
    endpoint: TeacherEndpoint,
    model: str,
    max_new_tokens: int,
    retries: int = 4,
    backoff_s: float = 0.5,
    timeout_s: float = 60.0,
) -> Complete:
    """Greedy chat completions, one prompt per call; a failed call (network error, 5xx, 429, a malformed
    body) is retried `retries` times after backoff_s x 2^i seconds, then TeacherError."""
    key = endpoint.api_key or (os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = endpoint.url.rstrip("/") + "/chat/completions"

    def one(client: httpx.Client, prompt: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_new_tokens,
            "stop": STOPS,
        }
        reason = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff_s * 2 ** (attempt - 1))
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:
                reason = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                reason = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:  # the request itself is wrong: retrying will not help
                raise TeacherError(f"the teacher endpoint answered HTTP {response.status_code}")
            try:
                return str(response.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError):
                reason = "a response without choices[0].message.content"
        raise TeacherError(f"the teacher endpoint failed {retries + 1} times (last: {reason})")

    def complete(prompts: list[str]) -> list[str]:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            return [one(client, prompt) for prompt in prompts]

    return complete


def engine_teacher(model, tokenizer, depth: int | None, max_new_tokens: int, batch_size: int = 8) -> Complete:
    """Greedy continuations from a model at exit depth `depth` (None: full depth), in the engine's
    batches; each stops at the answer format's end (a blank line or a new "Input:")."""
    from workers.generation.engine import EarlyExitEngine, GenerationRequest

    engine = EarlyExitEngine(model, tokenizer, max_batch_size=batch_size, precision="float32")
    depth = depth or engine.num_layers

    def complete(prompts: list[str]) -> list[str]:
        requests = []
        for prompt in prompts:
            ids = list(tokenizer.encode(prompt, add_special_tokens=False))
            if getattr(tokenizer, "bos_token_id", None) is not None:
                ids = [tokenizer.bos_token_id, *ids]
            room = (engine.max_positions or len(ids) + max_new_tokens) - len(ids)
            if room < 1:
                raise TeacherError(
                    f"a few-shot prompt of {len(ids)} tokens leaves no room in the teacher's context; "
                    "give fewer or shorter demonstrations"
                )
            requests.append(
                GenerationRequest(
                    prompt_ids=ids, depth=depth, max_new_tokens=min(max_new_tokens, room), stop=STOPS
                )
            )
        return [finish.text for finish in engine.run(requests)]

    return complete


def cache_key(teacher_id: str, prompt: str) -> str:
    return hashlib.sha256(f"{teacher_id}\n{prompt}".encode()).hexdigest()


class AnswerCache:
    """Teacher continuations by cache_key, in an append-only JSONL file (a torn last line is ignored);
    without a path, in memory only."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.answers: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[str(entry["key"])] = str(entry["text"])
                except (ValueError, KeyError, TypeError):
                    continue

    def add(self, entries: dict[str, str]) -> None:
        self.answers.update(entries)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for key, text in entries.items():
                handle.write(json.dumps({"key": key, "text": text}) + "\n")


def ask_teacher(
    prompts: Sequence[str],
    complete: Complete,
    cache: AnswerCache,
    teacher_id: str,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[str], int]:
    """The continuation of every prompt, and how many came from the cache; each answered batch is cached
    before the next is asked."""
    keys = [cache_key(teacher_id, p) for p in prompts]
    cached = sum(key in cache.answers for key in keys)
    missing = [i for i, key in enumerate(keys) if key not in cache.answers]
    done = len(prompts) - len(missing)
    for start in range(0, len(missing), batch_size):
        if should_stop is not None and should_stop():
            raise TeacherError(f"cancelled; {len(cache.answers)} teacher answers are cached")
        chunk = missing[start : start + batch_size]
        try:
            texts = complete([prompts[i] for i in chunk])
        except TeacherError as e:
            have = sum(key in cache.answers for key in keys)
            raise TeacherError(
                f"{e}; {have} of {len(prompts)} teacher answers are cached and a retry will not ask again"
            ) from None
        cache.add({keys[i]: text for i, text in zip(chunk, texts, strict=True)})
        done += len(chunk)
        if progress is not None:
            progress(done, len(prompts))
    return [cache.answers[key] for key in keys], cached
