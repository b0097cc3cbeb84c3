"""A terminal progress bar for headless runs, fed by the executor's event stream."""

from __future__ import annotations

from typing import TextIO


class ProgressPrinter:
    def __init__(self, stream: TextIO, enabled: bool = True):
        self.stream, self.enabled = stream, enabled
        self._open_line = False

    def __call__(self, kind: str, data: dict) -> None:
        if not self.enabled:
            return
        if kind == "executing":
            self._line(f"node {data['node']}")
        elif kind == "progress":
            value, total = data["value"], max(1, data["max"])
            filled = int(30 * value / total)
            self._line(
                f"node {data['node']} [{'#' * filled}{'.' * (30 - filled)}] {value}/{total}", newline=False
            )
        elif kind == "execution_cached":
            self._line(f"cached: {', '.join(data['nodes'])}")

    def _line(self, text: str, newline: bool = True) -> None:
        self.stream.write(
            ("\r" if not newline and self._open_line else ("\n" if self._open_line else "")) + text
        )
        self._open_line = not newline
        if newline:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open_line:
            self.stream.write("\n")
            self._open_line = False
