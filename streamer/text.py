"""Words for people: a count with its noun in the right number ("1 session", "2 sessions")."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`number` and `noun`, the noun plural unless the number is 1 (plural: default noun + "s")."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
