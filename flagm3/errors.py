"""A user's mistake on the command line (a missing model or file, malformed data, a bad value) ends in one line
on stderr and exit code 1, not a traceback. ``FLAGM3_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

# OSError: missing files/directories, unreadable checkpoints, hub lookups (transformers wraps them in OSError);
# ValueError: malformed JSON/JSONL/TSV, bad values, DataValidationError, CheckpointError, HFValidationError.
USER_ERRORS = (OSError, ValueError)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` raised inside into ``prog: message`` and ``sys.exit(1)``."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("FLAGM3_TRACEBACK"):
            raise
        sys.exit(f"{prog}: {one_line(err)}")
    except ModuleNotFoundError as err:  # an optional dependency (an extra) is not installed
        if os.environ.get("FLAGM3_TRACEBACK") or not err.name or err.name.split(".")[0] == "flagm3":
            raise
        extra = " (pip install 'flagm3[demo]')" if prog.endswith("demo") else ""
        sys.exit(f"{prog}: needs the Python module {err.name!r}, which is not installed{extra}")


def check_model(value: Optional[str], option: str) -> None:
    """A model argument names an existing directory or something shaped like a hub id (``org/name``)."""
    if value is None or os.path.isdir(value):
        return
    if os.path.exists(value):
        raise NotADirectoryError(f"{option} {value}: a file, not a model directory")
    if not _HUB_ID.match(value) or value.startswith((".", "~")) or ".." in value or value.count("/") > 1:
        raise FileNotFoundError(f"{option} {value}: no such model directory (and not a Hugging Face Hub id)")


def check_file(value: Optional[str], option: str) -> None:
    """A file argument names an existing file."""
    if value is None or os.path.isfile(value):
        return
    what = "a directory, not a file" if os.path.isdir(value) else "no such file"
    raise FileNotFoundError(f"{option} {value}: {what}")
