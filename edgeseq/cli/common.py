"""What every ``edgeseq`` command shares: the one-line error, strict JSON and plain output."""
from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

#: set to show the traceback of an unexpected error instead of its one-line summary
DEBUG_ENV = "EDGESEQ_DEBUG"


def _one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line: a library message that lists several problems joins them with
    "; " so that a script reading stderr still gets exactly one error line."""
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = "; ".join(parts)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _fail(msg: str, code: int = 2) -> NoReturn:
    click.echo(f"edgeseq: error: {_one_line(msg, 2000)}", err=True)
    sys.exit(code)


def _describe(e: BaseException) -> str:
    """An exception as a short phrase: its message, else its type."""
    msg = _one_line(str(e))
    return msg or type(e).__name__


def _json(obj: Any, what: str, **kw: Any) -> None:
    """Print ``obj`` as JSON that every parser reads: a NaN or infinity (which Python would
    write as the non-standard ``NaN``) is an error naming ``what`` instead."""
    try:
        text = json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        _fail(f"{what}: the result holds a non-finite number (NaN or infinity); refusing to "
              f"print invalid JSON", 1)
    click.echo(text)


def _finite(name: str, value: float | None) -> float | None:
    """A float option as given, refusing NaN and infinity (``float("nan")`` is what click's
    float type accepts for "nan", and a NaN temperature samples token 0 forever)."""
    from edgeseq.limits import LimitError, check_finite

    if value is None:
        return None
    try:
        return check_finite(name, value)
    except LimitError as e:
        _fail(str(e))


def _write(text: str) -> None:
    """A piece of a stream, shown at once (``click.echo`` costs 15 µs a call: 1.5% of a token)."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()

