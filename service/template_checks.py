"""Chat templates are checked when they are registered, not only when a request first uses them: a model
imported with, or a merge recipe naming, a template that does not compile or exceeds the rendering limits
(`workers.templates.renderer`) is refused with 422 before anything is stored or queued."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import HTTPException

from workers.merge.chat_templates import NAMED_TEMPLATES
from workers.templates.renderer import TemplateUnusable, check


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


def check_or_422(template: str | None, what: str) -> None:
    """422 naming `what` if `template` is unusable; named templates ("chatml") and "auto" pass."""
    if not template or template == "auto" or template in NAMED_TEMPLATES:
        return
    try:
        check(template)
    except TemplateUnusable as e:
        raise HTTPException(422, f"{what}: the chat template is unusable ({e})") from e
