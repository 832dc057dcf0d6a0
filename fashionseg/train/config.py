"""The run configuration: one typed tree of the components' own dataclasses, validated by pydantic.

Each component owns the dataclass of its settings and validates its values in `__post_init__`
(`LoaderConfig` in data/loader.py, `ModelConfig` in model/build.py, `HardMiningConfig` in
train/hard_mining.py, the trainer's below). This module only composes them into `Config`, reads
YAML, applies dotted command-line overrides at any depth (`model.loss_weights.loss_mask=2.0`) and
turns every problem into one ConfigError naming the file, the dotted key and, for a typo, the
closest valid key. The resolved config is what the run directory and `model_final.pth` record.

Disabled components: a key set in a section whose `enabled` is false is kept, and a warning says
that it has no effect until `<section>.enabled=true` (enabling silently would surprise more).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from fashionseg.data.loader import LoaderConfig
from fashionseg.io import atomic_write_text
from fashionseg.model.build import REMOVED_KEYS, ModelConfig
from fashionseg.names import Backend, Precision
from fashionseg.train.hard_mining import HardMiningConfig

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file/key and what to do."""


@dataclass
class DataConfig(LoaderConfig):
    """The loader's settings plus where the shards live (`--shards` overrides it)."""

    shards: str | None = None


@dataclass
class TrainConfig:
    """Optimisation, precision, distribution and checkpointing of the training loop. The trainer
    owns the batch layout: `batch_size` per rank, or `batch_sizes` one per rank (mixed GPUs)."""

    batch_size: int = 2                      # images per rank per micro-step
    batch_sizes: list[int] | None = None     # per-rank batch sizes in global rank order (launcher)
    max_steps: int | None = 1000             # optimizer steps; None: epochs * steps_per_epoch
    epochs: int | None = None                # used only when max_steps is None
    seed: int = 42
    lr: float | str = "auto"                 # a number, or "auto" = base_lr * global_batch / base_batch
    base_lr: float = 0.02
    base_batch: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["multistep", "cosine", "cosine_restarts", "constant"] = "multistep"
    cycles: int = 1                          # cosine_restarts: equal cycles after warmup, a snapshot at each end
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # fractions of max_steps
    gamma: float = 0.1
    min_lr_factor: float = 0.0               # cosine floor, as a fraction of the peak lr
    warmup_factor: float = 0.001
    warmup_iters: int | None = None          # None: min(1000, steps_per_epoch - 1), torchvision's reference
    clip_grad_norm: float | None = None
    accumulate_steps: int = 1
    precision: Precision = "auto"
    channels_last: bool = False              # NHWC activations (tensor-core GPUs)
    backend: Backend = "ddp"
    zero_stage: int = 2                      # DeepSpeed ZeRO stage (1 or 2) when backend=deepspeed
    checkpoint_every: int = 1000             # optimizer steps between checkpoints (also at epoch end)
    keep_checkpoints: int = 3
    max_nonfinite: int = 5                   # consecutive non-finite losses before aborting
    deterministic: bool = False
    record_samples: bool = False             # samples.jsonl: the keys every rank trained on, per step
    collective_timeout_s: float = 1800.0     # process-group timeout (gloo and NCCL): a dead peer ends the run
    stall_timeout_s: float | None = None     # watchdog: no step for this long -> dump stacks, exit 3 (> one eval pass)

    def __post_init__(self) -> None:
        if isinstance(self.lr, str) and self.lr != "auto":
            try:  # YAML reads 1e-3 (no dot) as a string
                self.lr = float(self.lr)
            except ValueError:
                raise ValueError(f"train.lr must be a number or 'auto', got {self.lr!r}") from None
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        for key in ("batch_size", "checkpoint_every", "accumulate_steps", "keep_checkpoints", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError("train.batch_sizes must be a non-empty list of positive ints")
        if self.zero_stage not in (1, 2):
            raise ValueError("train.zero_stage must be 1 or 2 (ZeRO-3 shards parameters; not supported)")
        if self.cycles < 1:
            raise ValueError(f"train.cycles must be >= 1, got {self.cycles}")
        if self.cycles > 1 and self.schedule != "cosine_restarts":
            raise ValueError(f"train.cycles={self.cycles} has no effect with train.schedule={self.schedule}: "
                             "set train.schedule=cosine_restarts (snapshot ensembles), or leave train.cycles at 1")
        if self.max_steps is not None and self.schedule == "cosine_restarts" and \
                self.max_steps - (self.warmup_iters or 0) < self.cycles:
            raise ValueError(f"train.cycles={self.cycles} leaves less than one step per cycle: train.max_steps="
                             f"{self.max_steps} minus {self.warmup_iters or 0} warmup steps; lower train.cycles")
        if any(not 0.0 < m <= 1.0 for m in self.milestones):
            raise ValueError(f"train.milestones are fractions of max_steps in (0, 1], got {self.milestones}")
        if not self.collective_timeout_s > 0:
            raise ValueError("train.collective_timeout_s must be > 0")
        if self.stall_timeout_s is not None and not (self.stall_timeout_s > 0 and math.isfinite(self.stall_timeout_s)):
            raise ValueError("train.stall_timeout_s must be a positive number of seconds, or null (off)")


@dataclass
class EvalConfig:
    """When and how the loop evaluates on val (the metric itself is fashionseg.eval's)."""

    every_epochs: int = 1                    # 0 disables evaluation during training
    split: str = "val"
    batch_size: int = 2
    at_end: bool = True                      # evaluate once more after the last step
    max_images: int | None = None            # evaluate on the first N images only (quick checks)


@dataclass
class LogConfig:
    every: int = 20                          # optimizer steps between log lines / metrics rows
    window: int = 20                         # MetricLogger smoothing window (median)
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = "fashionseg"
    rich: bool = True                        # progress display when stdout is a terminal


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hard_mining: HardMiningConfig = field(default_factory=HardMiningConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def shards(self) -> str | None:
        return self.data.shards

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())


_ADAPTER = TypeAdapter(Config)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# -- keys ---------------------------------------------------------------------------------------
def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside an annotation (`X`, `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = (f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close
            else f"; valid keys: {', '.join(sorted(valid))}")
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_keys(raw: Any, cls: type, where: str, prefix: str = "") -> None:
    """Every key of `raw` names a field of `cls` (recursively into nested dataclasses)."""
    if not isinstance(raw, dict):
        what = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"{where}: {what} must be a mapping, got {raw!r}")
    types = _field_types(cls)
    for key, value in raw.items():
        if cls is ModelConfig and key in REMOVED_KEYS:
            raise ConfigError(f"{where}: 'model.{key}' is gone: the data layer owns every resize. Set the training scale "
                              "with data.min_size / data.max_size and the test scale with data.test_size")
        if key not in types:
            raise _unknown(f"{prefix}{key}", list(types), where)
        inner = _dataclass_of(types[key])
        if inner is not None and value is not None:
            _check_keys(value, inner, where, f"{prefix}{key}.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as a YAML scalar or flow list/map)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"command line: override '{text}' is not of the form section.key=value (e.g. train.lr=0.01)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override '{text}': the value is not valid YAML ({e})") from e
    return [p.strip() for p in key.split(".")], value


def _apply_override(raw: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set raw[path] = value, walking dataclass fields (checked) and then plain mappings."""
    node: Any = raw
    cls: type | None = Config
    for i, part in enumerate(path[:-1]):
        if cls is not None:
            types = _field_types(cls)
            if part not in types:
                raise _unknown(".".join(path[: i + 1]), list(types), f"command line ({text})")
            tp, cls = types[part], _dataclass_of(types[part])
            if cls is None and not any(typing.get_origin(a) is dict for a in (tp, *typing.get_args(tp))):
                raise ConfigError(f"command line ({text}): '{'.'.join(path[: i + 1])}' is a value, not a section: "
                                  f"set it as {'.'.join(path[: i + 1])}=VALUE")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command line ({text}): '{'.'.join(path[: i + 1])}' is not a mapping")
        node = child
    if cls is not None:
        types = _field_types(cls)
        if path[-1] not in types:
            raise _unknown(".".join(path), list(types), f"command line ({text})")
    node[path[-1]] = value


# -- validation -----------------------------------------------------------------------------------
def _close_choice(value: Any, expected: str) -> str:
    choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _message(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if err["type"] == "value_error":  # a component's __post_init__: its message names the key
            lines.append(f"{where}: {err['ctx']['error']}")
            continue
        msg = err["msg"]
        if err["type"] == "literal_error":
            msg += _close_choice(err.get("input"), err["ctx"]["expected"])
        lines.append(f"{where}: '{loc}': {msg} (got {err.get('input')!r})")
    return "\n".join(dict.fromkeys(lines))


def _warn_disabled(raw: dict[str, Any], cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        body, obj = raw.get(section.name), getattr(cfg, section.name)
        if isinstance(body, dict) and getattr(obj, "enabled", True) is False:
            set_keys = sorted(k for k in body if k != "enabled")
            if set_keys:
                log.warning("%s.%s set but %s.enabled is false: no effect until %s.enabled=true",
                            section.name, ", ".join(set_keys), section.name, section.name)


def from_dict(raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), where: str = "<config>") -> Config:
    """Validate a nested mapping (as read from YAML) plus dotted overrides into a Config."""
    raw = {} if raw is None else raw
    _check_keys(raw, Config, where)
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        _apply_override(merged, path, value, text)
    _check_keys(merged, Config, where)
    merged = {k: ({} if v is None else v) for k, v in merged.items()}
    try:
        cfg = _ADAPTER.validate_python(merged)
    except ValidationError as e:
        raise ConfigError(_message(e, where)) from None
    except (TypeError, ValueError) as e:  # a __post_init__ outside pydantic's wrapping
        raise ConfigError(f"{where}: {e}") from None
    _warn_disabled(merged, cfg)
    return cfg


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (None: all defaults) and apply dotted overrides."""
    raw: dict[str, Any] | None = None
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return from_dict(raw, overrides, where)
