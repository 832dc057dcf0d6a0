"""One validated run configuration composed from the components' own dataclasses.

Each component owns the dataclass of its settings (`LoaderConfig`, `ModelConfig`,
`HardMiningConfig`); this module only composes them into sections, loads YAML, applies dotted
command-line overrides (`train.lr=0.01`, `train.batch_sizes=[2,2,4]`) and rejects any key it does
not know, naming the closest valid one. The resolved config is what the run directory records
and what `model_final.pth` carries, so a run can always be rebuilt from its own files.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fashionseg.io import atomic_write_text


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file/key and what to do."""


@dataclass
class TrainConfig:
    """Optimisation, precision, distribution and checkpointing of the training loop."""

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
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # fractions of max_steps
    gamma: float = 0.1
    min_lr_factor: float = 0.0               # cosine floor, as a fraction of the peak lr
    warmup_factor: float = 0.001
    warmup_iters: int | None = None          # None: min(1000, steps_per_epoch - 1) as seed 000
    clip_grad_norm: float | None = None
    accumulate_steps: int = 1
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 2                      # DeepSpeed ZeRO stage (1 or 2) when backend=deepspeed
    checkpoint_every: int = 1000             # optimizer steps between checkpoints (also at epoch end)
    keep_checkpoints: int = 3
    max_nonfinite: int = 5                   # consecutive non-finite losses before aborting
    deterministic: bool = False
    debug_nan_steps: list[int] = field(default_factory=list)  # TEST ONLY: poison the loss at these steps


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
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow
    project: str = "fashionseg"
    rich: bool = True                        # progress display when stdout is a terminal


# section name -> (module, dataclass name). Components' dataclasses are imported lazily so that
# `fashionseg train --help` stays fast and a missing optional component names itself.
SECTIONS: dict[str, tuple[str, str]] = {
    "data": ("fashionseg.data.loader", "LoaderConfig"),
    "model": ("fashionseg.model.build", "ModelConfig"),
    "train": (__name__, "TrainConfig"),
    "eval": (__name__, "EvalConfig"),
    "hard_mining": ("fashionseg.train.hard_mining", "HardMiningConfig"),
    "log": (__name__, "LogConfig"),
}
# Keys a section has beyond its component's dataclass (the loader does not know where shards live).
EXTRA_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {"data": {"shards": (str | None, None)}}


def section_class(name: str) -> type:
    mod, cls = SECTIONS[name]
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config section '{name}' needs {mod}.{cls}, which cannot be imported ({e})") from e


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def section_schema(name: str) -> dict[str, Any]:
    """Field name -> type of one section (the component's fields plus this module's extras)."""
    schema = _hints(section_class(name))
    for key, (tp, _) in EXTRA_KEYS.get(name, {}).items():
        schema[key] = tp
    return schema


# -- type checking of YAML values --------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against annotation `tp`; ints become floats where a float is expected,
    lists become tuples where a tuple is expected. ConfigError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        real = [a for a in args if a is not type(None)]
        for a in real:
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise ConfigError(f"{errors[0]}" + (" (or null)" if type(None) in args else ""))
        raise ConfigError(f"'{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{key}': {value!r} is not one of {list(args)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{key}': expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: accept what float() reads
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}': expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"'{key}': expected null, got {value!r}")
        return None
    return value  # anything more exotic is the component's to validate


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


@dataclass
class Config:
    """The composed configuration; `sections[name]` is that component's dataclass instance."""

    sections: dict[str, Any]
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("sections", "extras"):
            raise AttributeError(name)
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def shards(self) -> str | None:
        return self.extras.get("data", {}).get("shards")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, obj in self.sections.items():
            d = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            d.update(self.extras.get(name, {}))
            out[name] = d
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return v


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value parsed as a YAML scalar or flow list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e})") from e
    return key.strip(), value


def from_dict(raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), where: str = "<config>") -> Config:
    """Validate a nested mapping (as read from YAML) plus dotted overrides into a Config."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    merged: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise _unknown(str(name), list(SECTIONS), where)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{name}' must be a mapping, got {body!r}")
        merged[name] = dict(body)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise _unknown(parts[0], list(SECTIONS), f"command line ({key})")
        if len(parts) != 2:
            raise ConfigError(f"command line: override '{key}' must name section.key (e.g. train.lr=0.01)")
        merged.setdefault(parts[0], {})[parts[1]] = value

    sections: dict[str, Any] = {}
    extras: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        body = merged.get(name, {})
        schema = section_schema(name)
        cls = section_class(name)
        extra_spec = EXTRA_KEYS.get(name, {})
        kwargs: dict[str, Any] = {}
        extras[name] = {k: default for k, (_, default) in extra_spec.items()}
        for key, value in body.items():
            if key not in schema:
                raise _unknown(f"{name}.{key}", list(schema), where)
            value = coerce(value, schema[key], f"{name}.{key}")
            if key in extra_spec:
                extras[name][key] = value
            else:
                kwargs[key] = value
        try:
            sections[name] = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: section '{name}' is invalid: {e}") from e
        if not extras[name]:
            del extras[name]
    cfg = Config(sections, extras)
    _check(cfg, where)
    return cfg


def _check(cfg: Config, where: str) -> None:
    t: TrainConfig = cfg.train
    if isinstance(t.lr, str) and t.lr != "auto":
        raise ConfigError(f"{where}: 'train.lr' must be a number or 'auto', got {t.lr!r}")
    if t.max_steps is None and t.epochs is None:
        raise ConfigError(f"{where}: set 'train.max_steps' or 'train.epochs'")
    for key in ("batch_size", "checkpoint_every", "accumulate_steps", "keep_checkpoints", "max_nonfinite"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{where}: 'train.{key}' must be >= 1, got {getattr(t, key)}")
    if t.batch_sizes is not None and (not t.batch_sizes or min(t.batch_sizes) < 1):
        raise ConfigError(f"{where}: 'train.batch_sizes' must be a non-empty list of positive ints")
    if t.zero_stage not in (1, 2):
        raise ConfigError(f"{where}: 'train.zero_stage' must be 1 or 2 (ZeRO-3 shards parameters; not supported)")
    if any(not 0.0 < m <= 1.0 for m in t.milestones):
        raise ConfigError(f"{where}: 'train.milestones' are fractions of max_steps in (0, 1], got {t.milestones}")


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
