"""A user's mistake on the command line (a missing model or file, malformed data, a bad value) ends in one line
on stderr and exit code 1, not a traceback. ``FLAGM3_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

# OSError: missing files/directories, unreadable checkpoints, hub lookups (transformers wraps them in OSError);
# ValueError: malformed JSON/JSONL/TSV, bad values, DataValidationError, CheckpointError, HFValidationError.
USER_ERRORS = (OSError, ValueError)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


_HUB_UNREACHABLE = ("internet connection", "ConnectError", "Name or service not known", "couldn't connect")


def hub_lookup_failed(err: BaseException, models: Mapping[str, Optional[str]]) -> Optional[str]:
    """The message for a hub lookup that failed for a model given on the command line (``{option: value}``) that
    is no local directory: say that the path does not exist, not "check your internet connection"."""
    text = str(err)
    if not any(marker in text for marker in _HUB_UNREACHABLE):
        return None
    for option, value in models.items():
        if value and not os.path.isdir(value):
            return (f"{option} {value}: no such model directory, and no Hugging Face Hub model of that id could be "
                    "reached (check the path; hub ids need a connection)")
    return None


@contextmanager
def user_errors(prog: str, models: Optional[Mapping[str, Optional[str]]] = None) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` raised inside into ``prog: message`` and ``sys.exit(1)``. ``models``: the
    model options of the command line (``{"--model": value}``), named when a hub lookup for them fails."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("FLAGM3_TRACEBACK"):
            raise
        sys.exit(f"{prog}: {hub_lookup_failed(err, models or {}) or one_line(err)}")
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
    parent = os.path.dirname(value)
    if parent and os.path.isdir(parent):  # runs/m3x next to runs/m3: a mistyped path, not an organisation's model
        raise FileNotFoundError(f"{option} {value}: no such model directory ({parent}/ exists, but holds no "
                                f"{os.path.basename(value)})")


def check_file(value: Optional[str], option: str) -> None:
    """A file argument names an existing file."""
    if value is None or os.path.isfile(value):
        return
    what = "a directory, not a file" if os.path.isdir(value) else "no such file"
    raise FileNotFoundError(f"{option} {value}: {what}")
