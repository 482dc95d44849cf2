"""Errors the store's import/export code raises; their text is shown to people as is."""

from __future__ import annotations

import re
from pathlib import Path


class ImportFailed(ValueError):
    """An import that wrote nothing. str() is one line: the file, the line or row, and what is wrong."""

    def __init__(self, path: str | Path, problem: str, where: str | None = None):
        self.path = str(path)
        self.where = where
        self.problem = " ".join(str(problem).split("\n"))  # always one line, whatever a library's message holds
        location = f"{Path(path).name}, {where}" if where else Path(path).name
        super().__init__(f"{location}: {self.problem}")


class StoreOpenError(RuntimeError):
    """The database file cannot be opened or set up. str() is one line saying why and what to do."""

    def __init__(self, path: str | Path, cause: BaseException):
        self.path, self.cause = without_password(str(path)), cause
        text = " ".join(str(cause).split()).replace(str(path), self.path)
        low = text.lower()
        if "lock" in low and ("conflicting" in low or "could not set" in low):
            holder = text[text.find("(PID") :].split(")")[0] + ")" if "(PID" in text else ""
            why = f"it is in use by another process {holder}".rstrip() + ": stop it or pass another --db"
        elif "no space" in low or "disk full" in low or "file too large" in low:
            why = f"no room to write it: the disk is full or a file size limit was hit ({text})"
        elif "permission denied" in low or "read-only" in low or "operation not permitted" in low:
            why = f"the path is not writable ({text}): pass a --db in a folder you can write to"
        else:
            why = text
        super().__init__(f"cannot open the database {self.path}: {why}")


def without_password(location: str) -> str:
    """A database URL as it may be shown or logged: postgresql://user:secret@host/db → postgresql://user:***@host/db."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*):[^@]*@", r"\1:***@", location)
