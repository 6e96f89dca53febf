"""Text to values: what the command line and the sweep specs (``name=value``) share."""

from __future__ import annotations

from typing import Any


def parse_value(text: str) -> Any:
    """'12' -> 12, '0.9' -> 0.9, 'true' -> True, 'none' -> None, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
