"""A model's chat template is code from whoever made the model: it is rendered here, in a process of its
own (`python -m workers.templates.sandbox`, driven by `workers.templates.renderer`), never in the API.

Jinja runs in transformers' sandboxed environment (no attribute access to internals, no I/O, `range` capped)
with the same arguments as `tokenizer.apply_chat_template`. What the sandbox cannot bound is bounded here
and by the caller: memory (an address-space limit on this process, so `'ab' * 10**10` is a MemoryError),
output (at most `max_chars` characters come back) and time (the caller kills this process at its
deadline: nested loops run to any length within `range`'s cap).

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout; `{"ready": true}` first.
A reply is `{"text": ...}` or `{"error": kind, "message": ...}` where kind is
- `unusable`: the template's own fault whatever the messages (does not compile, output or memory too large);
- `failed`: it raised for these messages (`raise_exception("no system role")`, a missing key).
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

MEMORY_HEADROOM_BYTES = 1 << 30  # beyond what the process holds once transformers' Jinja is imported


class TemplateUnusable(ValueError):
    """The template cannot serve any conversation within the limits (or does not compile)."""


class TemplateFailed(ValueError):
    """The template raised for this conversation."""


def render(
    template: str, messages: list[dict[str, Any]], special_tokens: dict[str, Any], max_chars: int
) -> str:
    """The conversation as `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` renders
    it, in this process (the caller bounds time)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=True, **special_tokens
        )
    except TemplateSyntaxError as e:
        raise TemplateUnusable(f"it does not compile ({e.message})") from e
    except MemoryError as e:
        raise TemplateUnusable("rendering it needs too much memory") from e
    except RecursionError as e:
        raise TemplateUnusable("rendering it recurses too deeply") from e
    except Exception as e:  # the template's code raised (raise_exception, a missing key, a type error)
        raise TemplateFailed(
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        ) from e
    text = rendered[0]
    if len(text) > max_chars:
        raise TemplateUnusable(f"it renders more than {max_chars} characters for {len(messages)} message(s)")
    return text


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def serve(lines: Any = sys.stdin, out: Any = sys.stdout) -> None:
    import transformers.utils.chat_template_utils  # noqa: F401  (imported before the memory limit is set)

    try:
        limit = _vm_bytes() + MEMORY_HEADROOM_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError):  # no /proc, or a lower hard limit: keep what there is
        pass
    out.write('{"ready": true}\n')
    out.flush()
    for line in lines:
        try:
            request = json.loads(line)
            text = render(
                request["template"], request["messages"], request["special_tokens"], request["max_chars"]
            )
            reply: dict[str, Any] = {"text": text}
        except TemplateUnusable as e:
            reply = {"error": "unusable", "message": str(e)}
        except TemplateFailed as e:
            reply = {"error": "failed", "message": str(e)}
        except MemoryError:
            reply = {"error": "unusable", "message": "rendering it needs too much memory"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
