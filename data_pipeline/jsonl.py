"""JSON Lines, as every reader of dlmoe takes them (corpora, SFT examples, quick-check pairs): one JSON value per
line, blank lines skipped, a bad line named ``file:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from dlmoe.errors import DataError


def jsonl_records(text: str, where: str) -> Iterator[tuple[str, Any]]:
    """(``where:line``, value) for every non-blank line of ``text``; ``DataError`` names ``where:line`` of a line
    that is not JSON."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{where}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{at}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield at, value
