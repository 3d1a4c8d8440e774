"""Chat templates rendered in a sandbox process (`workers.templates.sandbox`) with a deadline: a template
that loops for minutes costs its caller `timeout_s` and the process a restart, and blocks nothing else of
the caller's (the API's event loop, a job's heartbeat).

`render` serves a request; `check` is what registering a template (an import, a merge recipe's
`chat_template`, a merge output) must pass: a short sample conversation rendered within the limits."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers.templates.sandbox import TemplateFailed, TemplateUnusable

__all__ = [
    "TemplateFailed",
    "TemplateUnusable",
    "TemplateRenderer",
    "check",
    "output_limit",
    "renderer",
    "templates_in",
]

TIMEOUT_S = 2.0  # a real template renders in milliseconds
START_TIMEOUT_S = 120.0  # the sandbox imports transformers' Jinja helpers (seconds on a busy machine)
BASE_OUTPUT_CHARS = 64 * 1024
SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]
SAMPLE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def output_limit(messages: list[dict[str, Any]]) -> int:
    """What a template may render for `messages`: their text twice over plus 64 Ki characters of its own
    (role markers, a system prompt); beyond that the template, not the request, made it large."""
    return BASE_OUTPUT_CHARS + 2 * sum(len(str(m.get("content", ""))) for m in messages)


class TemplateRenderer:
    """One sandbox process, started on first use, replaced when it misses a deadline or dies; one render
    at a time (thread-safe)."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.templates.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._reply(process, START_TIMEOUT_S) != {"ready": True}:
            self._kill(process)
            raise RuntimeError("the chat template sandbox did not start")
        return process

    @staticmethod
    def _reply(process: subprocess.Popen, timeout_s: float) -> dict | None:
        """The next reply line, or None when the deadline passes or the process ends first."""
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([process.stdout], [], [], left)
            if readable:
                line = process.stdout.readline()
                return json.loads(line) if line else None

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()

    def render(
        self, template: str, messages: list[dict[str, Any]], special_tokens: dict[str, Any], max_chars: int
    ) -> str:
        """The rendered conversation; TemplateUnusable past the deadline or the limits, TemplateFailed when
        the template raised for these messages."""
        request = {
            "template": template,
            "messages": messages,
            "special_tokens": special_tokens,
            "max_chars": max_chars,
        }
        line = (json.dumps(request, default=str) + "\n").encode()
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            assert process.stdin is not None
            try:
                process.stdin.write(line)
                process.stdin.flush()
                reply = self._reply(process, self.timeout_s)
            except OSError:  # it died under us
                reply = None
            if reply is None:
                self._kill(process)
                self._process = None
                raise TemplateUnusable(f"it takes longer than {self.timeout_s:g} s to render")
        if "text" in reply:
            return reply["text"]
        error = TemplateUnusable if reply["error"] == "unusable" else TemplateFailed
        raise error(reply["message"])

    def warm(self) -> None:
        """Start the sandbox now (it takes seconds), so that the first chat request does not wait for it;
        if it cannot start, the first render says why."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                try:
                    self._process = self._start()
                except (OSError, RuntimeError):
                    self._process = None

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._kill(self._process)
                self._process = None


_renderer: TemplateRenderer | None = None
_renderer_lock = threading.Lock()


def renderer() -> TemplateRenderer:
    """This process's renderer."""
    global _renderer
    with _renderer_lock:
        if _renderer is None:
            _renderer = TemplateRenderer()
        return _renderer


def check(template: str) -> None:
    """TemplateUnusable if `template` does not compile or exceeds the limits on a short sample conversation
    (one that it refuses with its own exception, e.g. "no system role", is fine)."""
    try:
        renderer().render(template, SAMPLE, SAMPLE_TOKENS, output_limit(SAMPLE))
    except TemplateFailed:
        pass


def templates_in(directory: Path) -> list[str]:
    """Every chat template a tokenizer directory carries: tokenizer_config.json's `chat_template` (one, or
    a list of named ones), chat_template.jinja, chat_template.json. Unreadable files hold none here (the
    tokenizer's own checks report them)."""
    found: list[object] = []
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            found.append(json.loads((directory / name).read_text()).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        found.append((directory / "chat_template.jinja").read_text())
    except (OSError, ValueError):
        pass
    templates: list[str] = []
    for item in found:
        entries = item if isinstance(item, list) else [item]
        for entry in entries:
            template = entry.get("template") if isinstance(entry, dict) else entry
            if isinstance(template, str) and template.strip():
                templates.append(template)
    return templates
