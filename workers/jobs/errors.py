"""RQ exception handler: keep a one-line reason with every failed job."""

from __future__ import annotations

from rq.job import Job

from workers.settings import get_settings

MAX_REASON = 500


def one_line_reason(exc: BaseException) -> str:
    """`Type: message` on one line, without paths: an OSError says its cause (strerror), not the file it
    failed on; whatever else names the Strata home (the store's location) shows `$STRATA_HOME` instead."""
    message = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = exc.strerror
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {'; '.join(lines) or 'failed'}"
    try:
        home = str(get_settings().home)
    except ValueError:  # settings that do not validate: nothing to hide then
        home = ""
    if len(home) > 1:
        text = text.replace(home, "$STRATA_HOME")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def record_error(job: Job, exc_type: type[BaseException], exc_value: BaseException, tb) -> bool:
    job.meta["error"] = one_line_reason(exc_value)
    job.meta["message"] = "failed"
    job.save_meta()
    return True  # let RQ's default handling (move to the failed registry) run too
