"""Errors the store's import/export code raises; their text is shown to people as is."""

from __future__ import annotations

from pathlib import Path


class ImportFailed(ValueError):
    """An import that wrote nothing. str() is one line: the file, the line or row, and what is wrong."""

    def __init__(self, path: str | Path, problem: str, where: str | None = None):
        self.path = str(path)
        self.where = where
        self.problem = " ".join(str(problem).split("\n"))  # always one line, whatever a library's message holds
        location = f"{Path(path).name}, {where}" if where else Path(path).name
        super().__init__(f"{location}: {self.problem}")
