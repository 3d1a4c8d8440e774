"""Chat templates are checked when they are registered, not only when a request first uses them: a model
imported with, or a merge recipe naming, a template that does not compile or exceeds the rendering limits
(`workers.templates.renderer`) is refused with 422 before anything is stored or queued."""

from __future__ import annotations

from fastapi import HTTPException

from workers.merge.chat_templates import NAMED_TEMPLATES
from workers.templates.renderer import TemplateUnusable, check, templates_in

__all__ = ["check_or_422", "templates_in"]


def check_or_422(template: str | None, what: str) -> None:
    """422 naming `what` if `template` is unusable; named templates ("chatml") and "auto" pass."""
    if not template or template == "auto" or template in NAMED_TEMPLATES:
        return
    try:
        check(template)
    except TemplateUnusable as e:
        raise HTTPException(422, f"{what}: the chat template is unusable ({e})") from e
