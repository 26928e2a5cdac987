"""Shared ending of the benchmark scripts: print the Markdown report and optionally write it."""

from __future__ import annotations

import os


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text)
