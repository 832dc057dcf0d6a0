"""Logging for every command, configured once: library messages (the pretrained-weights report,
the freeze schedule, config warnings) reach the user on stderr, from rank 0 only under
torchrun/accelerate (other ranks show warnings and errors)."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("fashionseg")
    if getattr(root, "_fashionseg_configured", False):
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
    root._fashionseg_configured = True  # type: ignore[attr-defined]
