"""A real local OpenAI-compatible chat-completions server for the distill tests' endpoint teachers.

Each request to `/<route>/v1/chat/completions` is counted per route and its Authorization header kept; the
test's `answer(route, call_number, query)` gives the assistant's content, or None for an HTTP 503. `query`
is the text after the prompt's last `Input: ` (the record the teacher is asked about).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = Callable[[str, int, str], "str | None"]


@dataclass
class ServedTeacher:
    url: str
    calls: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


@contextmanager
def teacher_endpoint(answer: Answer) -> Iterator[ServedTeacher]:
    """Serves `answer` on 127.0.0.1 (a free port) for the duration of the block."""
    served: ServedTeacher

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            return None

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            route = self.path.split("/")[1]
            served.calls[route] = served.calls.get(route, 0) + 1
            served.keys.append(self.headers.get("Authorization", ""))
            query = body["messages"][0]["content"].rsplit("Input: ", 1)[-1]
            content = answer(route, served.calls[route], query)
            if content is None:
                self.send_response(503)
                self.end_headers()
                return
            message = {"role": "assistant", "content": content}
            payload = json.dumps({"choices": [{"message": message}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served = ServedTeacher(url=f"http://127.0.0.1:{server.server_address[1]}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
