"""Switch values parsed without any model code (the thin client's switches use them too)."""

from __future__ import annotations

import argparse


def ratio_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.02,0.1,1.0, got {text!r}")
