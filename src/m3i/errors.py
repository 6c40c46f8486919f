"""The one-line form of an exception, for the one-line errors m3i prints."""

from __future__ import annotations


def first_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of `err`'s message, stripped (its type's name when it has none); with
    `with_type`, prefixed by the type's name (`ImportError: ...`)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    return f"{type(err).__name__}: {line}" if with_type else line
