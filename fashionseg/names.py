"""Names the launcher and the trainer must spell alike. Imports nothing heavy (no torch), so the
launcher, the config schema and `--help` can read them cheaply."""
from __future__ import annotations

from typing import Literal

# Per-host list of per-rank batch sizes, indexed by LOCAL_RANK ("2,2,4"); set by the launcher.
LOCAL_BATCH_ENV = "FASHIONSEG_LOCAL_BATCH_SIZES"

Backend = Literal["ddp", "deepspeed"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
BACKENDS: tuple[str, ...] = Backend.__args__
PRECISIONS: tuple[str, ...] = Precision.__args__

# The trained-weights file every run ends with (fashionseg/model/weights_file.py owns its format).
FINAL_WEIGHTS = "model_final.pth"
