"""hosts.yaml: the rigs one training run spans, validated with file:line in every message.

The schema is a set of pydantic models (strict types, unknown keys forbidden). The file is read
through PyYAML's composer instead of `yaml.safe_load`, so every value keeps its line: pydantic's
errors are turned into `hosts.yaml:14: hosts[1].ssh_prot: unknown key (did you mean 'ssh_port'?)`.
What pydantic cannot see (duplicate keys, merge keys, YAML tags) is caught while reading the
nodes. All problems of a file are raised together as one `HostsError`.

    main_address: str      how the other hosts reach the first host (default: its address)
    main_port: int         rendezvous / TCPStore port on the first host (default 29500)
    rendezvous: static|c10d
    rdzv_id: str           job id shared by all hosts (default "fashionseg")
    backend: ddp|deepspeed       -> train.backend=... override (omitted when unset)
    precision: auto|fp32|fp16|bf16 -> train.precision=... override (omitted when unset)
    defaults: {any per-host key except name/address/gpus/batch_sizes}
    hosts: [ {name, address, gpus, device (auto|cuda|cpu), ssh_user, ssh_port, ssh_options, batch_size | batch_sizes,
              env, python | venv, workdir, log_dir}, ... ]
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fashionseg.names import BACKENDS, LOCAL_BATCH_ENV, PRECISIONS, Backend, Precision

LOCAL_ADDRESSES = frozenset({"localhost", "127.0.0.1", "::1"})
RENDEZVOUS = ("static", "c10d")
DEVICES = ("auto", "cuda", "cpu")
CHOICES = {"rendezvous": RENDEZVOUS, "backend": BACKENDS, "precision": PRECISIONS, "device": DEVICES}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the launcher itself: a hosts.yaml value would be silently overwritten.
# TORCH_ELASTIC_WORKER_IDENTICAL=1 makes torchrun assume equal process counts on every node.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", LOCAL_BATCH_ENV, "RANK", "LOCAL_RANK",
                "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "TORCH_ELASTIC_WORKER_IDENTICAL")


class HostsError(ValueError):
    """hosts.yaml cannot be used; the message lists every problem as `file:line: key: what`."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    gpus: tuple[int, ...]                 # CUDA device ids on that machine, one process each
    batch_sizes: tuple[int, ...] | None   # per local rank; None: the trainer's config decides
    ssh_user: str | None = None
    ssh_port: int | None = None
    ssh_options: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None             # None: this interpreter (local) / "python3" (remote)
    workdir: str | None = None            # None: current directory (local) / login dir (remote)
    log_dir: str | None = None            # torchrun --log-dir; None: torchrun's temp dir
    device: str = "auto"                  # cpu: ACCELERATE_USE_CPU=true; auto: cpu for a GPU-less local host
    line: int = 0

    @property
    def is_local(self) -> bool:
        return self.address in LOCAL_ADDRESSES

    @property
    def nproc(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class HostsFile:
    path: str
    hosts: tuple[Host, ...]
    main_address: str
    main_port: int = 29500
    rendezvous: str = "static"
    rdzv_id: str = "fashionseg"
    backend: str | None = None
    precision: str | None = None

    @property
    def world_size(self) -> int:
        return sum(h.nproc for h in self.hosts)

    def rank_ranges(self) -> list[range]:
        """Global ranks of each host (static rendezvous: node rank = position in the file)."""
        out, start = [], 0
        for h in self.hosts:
            out.append(range(start, start + h.nproc))
            start += h.nproc
        return out

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


# -- schema ------------------------------------------------------------------------------------
class _Tagged:
    """A value with a YAML tag safe_load refuses (`!!python/...`): fails every type check."""

    def __init__(self, tag: str):
        self.tag = tag


def _name(what: str, pattern: re.Pattern = _NAME_RE):
    def check(v: str) -> str:
        if not pattern.match(v):
            raise ValueError(f"{v!r} is not a valid {what}")
        return v
    return AfterValidator(check)


def _env_name(k: str) -> str:
    if not _ENV_RE.match(k):
        raise ValueError("not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    if k in RESERVED_ENV:
        raise ValueError("set by the launcher itself (use 'gpus' / 'batch_size(s)' instead)")
    return k


def _env_value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"expected a string or number, got {_tname(v)} (quote it: \"...\")")
    return str(v)


def _gpus(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"a GPU count must be >= 1, got {v}")
        return list(range(v))
    if not isinstance(v, list):
        raise ValueError(f"expected a list of GPU ids ([0, 1]) or a count (2), got {_tname(v)}")
    return v


def _distinct(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise ValueError(f"GPU ids repeat: {ids}")
    return ids


def _address(v: str) -> str:
    if v.startswith("-") or any(c.isspace() for c in v):
        raise ValueError(f"{v!r} is not a host address")
    return v


Text = Annotated[str, Field(min_length=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
RANGES = {"main_port": (1, 65535), "ssh_port": (1, 65535), "batch_size": (1, None), "batch_sizes": (1, None),
          "gpus": (0, None)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HostDefaults(_Strict):
    """Keys a host may take from `defaults:`."""

    device: Literal["auto", "cuda", "cpu"] | None = None
    ssh_user: Text | None = None
    ssh_port: Port | None = None
    ssh_options: list[Text] | None = None
    batch_size: Positive | None = None
    env: dict[Annotated[str, AfterValidator(_env_name)], Annotated[Any, AfterValidator(_env_value)]] | None = None
    python: Text | None = None
    venv: Text | None = None
    workdir: Text | None = None
    log_dir: Text | None = None

    @model_validator(mode="after")
    def _one_interpreter(self):
        if self.python is not None and self.venv is not None:
            raise ValueError("venv: set either 'python' or 'venv', not both")
        return self


class HostSpec(HostDefaults):
    name: Annotated[Text, _name("host name (letters, digits, '_', '.', '-')")]
    address: Annotated[Text, AfterValidator(_address)]
    gpus: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), BeforeValidator(_gpus),
                    AfterValidator(_distinct)]
    batch_sizes: Annotated[list[Positive], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _batch_layout(self):
        if self.batch_size is not None and self.batch_sizes is not None:
            raise ValueError("batch_sizes: set either 'batch_size' or 'batch_sizes', not both")
        if self.batch_sizes is not None and len(self.batch_sizes) != len(self.gpus):
            raise ValueError(f"batch_sizes: {len(self.batch_sizes)} batch sizes for {len(self.gpus)} GPUs "
                             f"(one per GPU, in 'gpus' order)")
        return self


class HostsSpec(_Strict):
    main_address: Text | None = None
    main_port: Port = 29500
    rendezvous: Literal["static", "c10d"] = "static"
    rdzv_id: Annotated[Text, _name("rendezvous id (letters, digits, '_', '.', '-')")] = "fashionseg"
    backend: Backend | None = None
    precision: Precision | None = None
    defaults: HostDefaults | None = None
    hosts: Annotated[list[HostSpec], Field(min_length=1)]


GLOBAL_KEYS = tuple(HostsSpec.model_fields)
HOST_KEYS = tuple(HostSpec.model_fields)
DEFAULT_KEYS = tuple(HostDefaults.model_fields)


# -- reading ---------------------------------------------------------------------------------
Loc = tuple  # a place in the file: ("hosts", 1, "ssh_port")


def _where(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _tname(v: Any) -> str:
    if isinstance(v, _Tagged):
        return f"a value tagged {v.tag} (YAML tags are not allowed)"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list" if v else "an empty list"
    return "null" if v is None else f"{v!r} ({type(v).__name__})"


def _suggest(key: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"


_CONSTRUCTOR = yaml.SafeLoader("")


class _Reader:
    """YAML nodes -> plain values; the line of every location; problems pydantic cannot see."""

    def __init__(self):
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[int, str]] = []

    def add(self, line: int, loc: Loc, msg: str) -> None:
        self.problems.append((line, f"{_where(loc) or 'top level'}: {msg}"))

    def value(self, node: Node, loc: Loc) -> Any:
        self.lines[loc] = node.start_mark.line + 1
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                line = knode.start_mark.line + 1
                if knode.tag == "tag:yaml.org,2002:merge":
                    self.add(line, loc, "merge keys (<<) are not supported; put shared values under 'defaults:'")
                    continue
                key = self.value(knode, loc + ("<key>",))
                if not isinstance(key, str):
                    self.add(line, loc, f"keys must be strings, got {_tname(key)}")
                    continue
                if key in first:
                    self.add(line, loc + (key,), f"duplicate key (first set on line {first[key]})")
                    continue
                first[key] = line
                out[key] = self.value(vnode, loc + (key,))
            return out
        if isinstance(node, SequenceNode):
            return [self.value(n, loc + (i,)) for i, n in enumerate(node.value)]
        try:
            return _CONSTRUCTOR.construct_object(node, deep=True)
        except yaml.YAMLError:
            return _Tagged(node.tag)

    def line(self, loc: Loc) -> int:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 0)


def _valid_keys(loc: Loc) -> tuple[str, ...]:
    if len(loc) == 1:
        return GLOBAL_KEYS
    return DEFAULT_KEYS if loc[0] == "defaults" else HOST_KEYS


def _message(err: dict[str, Any]) -> tuple[Loc, str]:
    """One pydantic error as (location, today's wording)."""
    loc = tuple(p for p in err["loc"] if p not in ("[key]",) and not str(p).startswith(("function-", "list[", "int")))
    kind, value, key = err["type"], err.get("input"), next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "extra_forbidden":
        return loc, "unknown key" + _suggest(str(loc[-1]), _valid_keys(loc))
    if kind == "missing":
        return loc[:-1], f"missing required key '{loc[-1]}'"
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
        if ": " in msg and msg.split(": ")[0] in HOST_KEYS:
            field_, msg = msg.split(": ", 1)   # a model-level check names its key
            loc = loc + (field_,)
        return loc, msg
    if kind in ("int_type", "int_parsing"):
        return loc, f"expected an integer, got {_tname(value)}"
    if kind in ("greater_than_equal", "less_than_equal"):
        lo, hi = RANGES.get(key, (None, None))
        return loc, f"{value} is out of range ({lo}..{hi if hi is not None else ''})"
    if kind in ("string_type", "string_too_short"):
        return loc, f"expected a non-empty string, got {_tname(value)}"
    if kind in ("literal_error", "enum"):
        return loc, f"expected one of {'|'.join(CHOICES.get(key, ()))}, got {_tname(value)}"
    if kind in ("list_type", "too_short"):
        if loc == ("hosts",):
            return loc, f"expected a non-empty list of hosts, got {_tname(value)}"
        what = "strings" if key == "ssh_options" else "integers"
        return loc, f"expected a {'non-empty ' if what == 'integers' else ''}list of {what}, got {_tname(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if len(loc) == 2 and loc[0] == "hosts":
            return loc, f"expected a mapping (name, address, gpus, ...), got {_tname(value)}"
        return loc, f"expected a mapping, got {_tname(value)}"
    return loc, err["msg"]


def _problems(e: ValidationError, reader: _Reader) -> None:
    seen = set()
    for err in e.errors(include_url=False):
        loc, msg = _message(err)
        if (loc, msg) in seen:
            continue
        seen.add((loc, msg))
        if loc == () and msg == "missing required key 'hosts'":
            reader.problems.append((1, msg + " (a list of hosts)"))
        else:
            reader.add(reader.line(loc), loc, msg)


def _host(spec: HostSpec, defaults: HostDefaults | None, line: int) -> Host:
    """One host with `defaults:` filled in (its own values win; env merged key by key)."""
    d = defaults.model_dump(exclude_none=True) if defaults is not None else {}
    own = spec.model_dump(exclude_none=True)
    if "python" in own or "venv" in own:
        d.pop("python", None), d.pop("venv", None)
    merged = {**d, **own, "env": {**d.get("env", {}), **own.get("env", {})}}
    bs = merged.get("batch_sizes")
    if bs is None and "batch_size" in merged:
        bs = [merged["batch_size"]] * len(spec.gpus)
    python = merged.get("python")
    if merged.get("venv"):
        python = merged["venv"].rstrip("/") + "/bin/python"
    return Host(
        name=spec.name, address=spec.address, gpus=tuple(spec.gpus), batch_sizes=tuple(bs) if bs else None,
        ssh_user=merged.get("ssh_user"), ssh_port=merged.get("ssh_port"),
        ssh_options=tuple(merged.get("ssh_options") or ()), env=merged["env"], python=python,
        workdir=merged.get("workdir"), log_dir=merged.get("log_dir"), device=merged.get("device") or "auto",
        line=line,
    )


def parse_hosts(text: str, path: str = "hosts.yaml") -> HostsFile:
    """Validate hosts.yaml text; raise HostsError listing every problem with its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        msg = f"{path}:{line}: not valid YAML: {getattr(e, 'problem', None) or e}"
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None:
            msg += f" ({ctx} started on line {cmark.line + 1})"
        if "'\\t'" in msg:
            msg += "; YAML does not allow tabs here: indent with spaces"
        raise HostsError(msg) from None
    if root is None:
        raise HostsError(f"{path}: empty file (expected a mapping with a 'hosts:' list)")
    reader = _Reader()
    raw = reader.value(root, ())
    spec = None
    try:
        spec = HostsSpec.model_validate(raw)
    except ValidationError as e:
        _problems(e, reader)
    if spec is not None and not reader.problems:
        hosts = [_host(h, spec.defaults, reader.line(("hosts", i))) for i, h in enumerate(spec.hosts)]
        _check_layout(hosts, spec, reader)
    if reader.problems:
        lines = [f"{path}:{line}: {msg}" for line, msg in sorted(reader.problems, key=lambda x: x[0])]
        n = len(lines)
        raise HostsError(f"{n} problem{'s' if n > 1 else ''} in {path}:\n  " + "\n  ".join(lines))
    return HostsFile(path=path, hosts=tuple(hosts), main_address=spec.main_address or hosts[0].address,
                     main_port=spec.main_port, rendezvous=spec.rendezvous, rdzv_id=spec.rdzv_id,
                     backend=spec.backend, precision=spec.precision)


def _check_layout(hosts: list[Host], spec: HostsSpec, reader: _Reader) -> None:
    """Across hosts: unique names, no GPU used twice on one machine, a main_address others can reach."""
    seen: dict[str, Host] = {}
    for h in hosts:
        if h.name in seen:
            reader.problems.append((h.line, f"hosts: duplicate host name '{h.name}' (first on line {seen[h.name].line})"))
        seen.setdefault(h.name, h)
    by_address: dict[str, Host] = {}
    for h in hosts:  # one machine listed twice (the loopback example) must not share a GPU
        key = "local" if h.is_local else h.address
        other = by_address.get(key)
        if other is not None and set(other.gpus) & set(h.gpus):
            shared = sorted(set(other.gpus) & set(h.gpus))
            reader.problems.append((h.line, f"hosts: '{h.name}' and '{other.name}' are the same machine ({h.address}) "
                                            f"and both use GPU {','.join(map(str, shared))}: give them disjoint gpus ids"))
        by_address.setdefault(key, h)
    main, remote = hosts[0], [h for h in hosts[1:] if not h.is_local]
    if not reader.problems and main.is_local and remote and (spec.main_address or main.address) in LOCAL_ADDRESSES:
        reader.add(reader.line(("main_address",)) if spec.main_address else 1, ("main_address",),
                   f"the first host '{main.name}' is {main.address} but '{remote[0].name}' is remote: set "
                   f"main_address to the first host's address as the other hosts reach it (e.g. its LAN IP)")


def load_hosts(path: str | Path) -> HostsFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HostsError(f"{path}: cannot read: {e.strerror}") from None
    return parse_hosts(text, str(path))
