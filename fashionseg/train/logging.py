"""What rank 0 tells people: torchvision's MetricLogger line, a rich progress bar, metrics.jsonl
and Accelerate's trackers (TensorBoard by default).

The line is the one users of torchvision's detection reference know:
`Epoch: [0] [ 100/22812] eta: 5:22:35 lr: 0.000102 loss: 1.5068 (2.1054) ... time: 0.7659 data: 0.3742 max mem: 3434`
(median of the window, then the global average in parentheses). metrics.jsonl gets one object per
logged step with the means over the steps since the previous row, so curves are not aliased.
"""
from __future__ import annotations

import datetime
import json
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch

from fashionseg.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class SmoothedValue:
    """A window of values (median, average) plus the global average since creation."""

    def __init__(self, window: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        if not self.deque:
            return float("nan")
        s = sorted(self.deque)
        m = len(s) // 2
        return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues and the torchvision-format line."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}
        self.lr = SmoothedValue(1, "{value:.6f}")
        self.iter_time = SmoothedValue(window, "{avg:.4f}")
        self.data_time = SmoothedValue(window, "{avg:.4f}")

    def update(self, **values: float) -> None:
        for k, v in values.items():
            if k not in self.meters:
                self.meters[k] = SmoothedValue(self.window)
            self.meters[k].update(float(v))

    def line(self, epoch: int, i: int, n: int) -> str:
        width = len(str(n))
        eta = self.iter_time.global_avg * max(n - i, 0)
        eta_s = str(datetime.timedelta(seconds=int(eta))) if eta == eta else "?"
        parts = [f"Epoch: [{epoch}]", f"[{i:>{width}}/{n}]", f"eta: {eta_s}", f"lr: {self.lr}"]
        # loss first, then its terms in a stable order
        for k in sorted(self.meters, key=lambda k: (k != "loss", k)):
            parts.append(f"{k}: {self.meters[k]}")
        parts += [f"time: {self.iter_time}", f"data: {self.data_time}"]
        if torch.cuda.is_available():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
        return "  ".join(parts)


class IntervalStats:
    """Sums since the last metrics row (means over the interval go to metrics.jsonl)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.losses: dict[str, float] = {}
        self.loss_n = 0
        self.step_time = 0.0
        self.data_time = 0.0
        self.images = 0

    def add(self, losses: dict[str, float] | None, step_time: float, data_time: float, images: int) -> None:
        self.n += 1
        self.step_time += step_time
        self.data_time += data_time
        self.images += images
        if losses is not None:
            self.loss_n += 1
            for k, v in losses.items():
                self.losses[k] = self.losses.get(k, 0.0) + v

    def row(self) -> dict[str, float]:
        out = {k: v / self.loss_n for k, v in self.losses.items()} if self.loss_n else {}
        out["images_per_sec"] = self.images / self.step_time if self.step_time > 0 else 0.0
        out["step_time"] = self.step_time / max(self.n, 1)
        out["data_time"] = self.data_time / max(self.n, 1)
        out["data_wait_frac"] = self.data_time / self.step_time if self.step_time > 0 else 0.0
        return out


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step so the file reads as one run."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLogger:
    """Rank 0's outputs. On other ranks every method is a no-op (but tracker calls stay safe)."""

    def __init__(self, run_dir: str | Path, accelerator, total_steps: int, *, rich: bool, window: int) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / METRICS_FILE
        self.metric_logger = MetricLogger(window)
        self.interval = IntervalStats()
        self.progress = None
        self._task = None
        self._file = None
        if self.main:
            self._file = open(self.path, "a", buffering=1)
            if rich and sys.stdout.isatty():
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
                self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                         TimeRemainingColumn(), transient=False)
                self._task = self.progress.add_task("train", total=total_steps)

    def __enter__(self) -> "RunLogger":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def print(self, text: str) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self._task, completed=step)

    def write_row(self, row: dict[str, Any], step: int) -> None:
        """One metrics.jsonl object, and the same scalars to the trackers."""
        if self.main and self._file is not None:
            self._file.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)
