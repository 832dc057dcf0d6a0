"""hosts.yaml: the rigs one training run spans, validated with file:line in every message.

The file is read through PyYAML's composer (nodes carry their start marks) instead of
`yaml.safe_load`, so a wrong key, a wrong type or a duplicate key is reported as
`hosts.yaml:14: hosts[1].ssh_prot: unknown key (did you mean 'ssh_port'?)`. All problems of a
file are collected and raised together as one `HostsError`.

Schema (docs/launcher.md has the prose):

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
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

LOCAL_ADDRESSES = frozenset({"localhost", "127.0.0.1", "::1"})
BACKENDS = ("ddp", "deepspeed")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
RENDEZVOUS = ("static", "c10d")

GLOBAL_KEYS = ("main_address", "main_port", "rendezvous", "rdzv_id", "backend", "precision",
               "defaults", "hosts")
DEVICES = ("auto", "cuda", "cpu")
HOST_KEYS = ("name", "address", "gpus", "device", "ssh_user", "ssh_port", "ssh_options", "batch_size",
             "batch_sizes", "env", "python", "venv", "workdir", "log_dir")
DEFAULT_KEYS = tuple(k for k in HOST_KEYS if k not in ("name", "address", "gpus", "batch_sizes"))

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the launcher itself: a hosts.yaml value would be silently overwritten.
# TORCH_ELASTIC_WORKER_IDENTICAL=1 makes torchrun assume equal process counts on every node.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "FASHIONSEG_LOCAL_BATCH_SIZES", "RANK", "LOCAL_RANK",
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


# -- reading ---------------------------------------------------------------------------------
class _Problems:
    def __init__(self, path: str):
        self.path = path
        self.items: list[tuple[int, str]] = []

    def add(self, node: Node | None, where: str, msg: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        self.items.append((line, f"{where}: {msg}" if where else msg))

    def raise_if_any(self) -> None:
        if self.items:
            lines = [f"{self.path}:{line}: {msg}" for line, msg in sorted(self.items, key=lambda x: x[0])]
            n = len(lines)
            raise HostsError(f"{n} problem{'s' if n > 1 else ''} in {self.path}:\n  " + "\n  ".join(lines))


def _suggest(key: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"


_CONSTRUCTOR = yaml.SafeLoader("")


class _Unreadable(str):
    """A value with a tag safe_load refuses (`!!python/...`); fails every type check."""


def _scalar(node: Node) -> Any:
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except yaml.YAMLError:
        return _Unreadable(f"<{node.tag}>")


def _tname(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list" if node.value else "an empty list"
    v = _scalar(node)
    if isinstance(v, _Unreadable):
        return f"a value tagged {node.tag} (YAML tags are not allowed)"
    return "null" if v is None else f"{v!r} ({type(v).__name__})"


def _mapping(node: Node, where: str, valid: tuple[str, ...], p: _Problems) -> dict[str, tuple[Node, Node]]:
    """Keys of a mapping node -> (key node, value node); unknown and duplicate keys reported."""
    if not isinstance(node, MappingNode):
        p.add(node, where, f"expected a mapping, got {_tname(node)}")
        return {}
    out: dict[str, tuple[Node, Node]] = {}
    for knode, vnode in node.value:
        if knode.tag == "tag:yaml.org,2002:merge":
            p.add(knode, where or "top level", "merge keys (<<) are not supported; put shared values under 'defaults:'")
            continue
        key = _scalar(knode) if isinstance(knode, ScalarNode) else None
        kwhere = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str):
            p.add(knode, where or "top level", f"keys must be strings, got {_tname(knode)}")
            continue
        if key in out:
            p.add(knode, kwhere, f"duplicate key (first set on line {out[key][0].start_mark.line + 1})")
            continue
        if valid and key not in valid:
            p.add(knode, kwhere, "unknown key" + _suggest(key, valid))
            continue
        out[key] = (knode, vnode)
    return out


def _str(node: Node, where: str, p: _Problems, pattern: re.Pattern | None = None, what: str = "") -> str | None:
    v = _scalar(node) if isinstance(node, ScalarNode) else node
    if not isinstance(v, str) or not v or isinstance(v, _Unreadable):
        p.add(node, where, f"expected a non-empty string, got {_tname(node)}")
        return None
    if pattern is not None and not pattern.match(v):
        p.add(node, where, f"{v!r} is not a valid {what}")
        return None
    return v


def _int(node: Node, where: str, p: _Problems, lo: int, hi: int | None = None) -> int | None:
    v = _scalar(node) if isinstance(node, ScalarNode) else None
    if not isinstance(v, int) or isinstance(v, bool):
        p.add(node, where, f"expected an integer, got {_tname(node)}")
        return None
    if v < lo or (hi is not None and v > hi):
        p.add(node, where, f"{v} is out of range ({lo}..{hi if hi is not None else ''})")
        return None
    return v


def _choice(node: Node, where: str, p: _Problems, choices: tuple[str, ...]) -> str | None:
    v = _scalar(node) if isinstance(node, ScalarNode) else None
    if v not in choices:
        p.add(node, where, f"expected one of {'|'.join(choices)}, got {_tname(node)}")
        return None
    return v


def _int_list(node: Node, where: str, p: _Problems, lo: int) -> list[int] | None:
    if not isinstance(node, SequenceNode) or not node.value:
        p.add(node, where, f"expected a non-empty list of integers, got {_tname(node)}")
        return None
    out = [_int(n, f"{where}[{i}]", p, lo) for i, n in enumerate(node.value)]
    return None if any(v is None for v in out) else out  # type: ignore[return-value]


def _str_list(node: Node, where: str, p: _Problems) -> list[str] | None:
    if not isinstance(node, SequenceNode):
        p.add(node, where, f"expected a list of strings, got {_tname(node)}")
        return None
    out = [_str(n, f"{where}[{i}]", p) for i, n in enumerate(node.value)]
    return None if any(v is None for v in out) else out  # type: ignore[return-value]


def _env(node: Node, where: str, p: _Problems) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, (knode, vnode) in _mapping(node, where, (), p).items():
        kwhere = f"{where}.{key}"
        if not _ENV_RE.match(key):
            p.add(knode, kwhere, "not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
            continue
        if key in RESERVED_ENV:
            p.add(knode, kwhere, "set by the launcher itself (use 'gpus' / 'batch_size(s)' instead)")
            continue
        v = _scalar(vnode) if isinstance(vnode, ScalarNode) else vnode
        if isinstance(v, (bool, _Unreadable)) or not isinstance(v, (str, int, float)):
            p.add(vnode, kwhere, f"expected a string or number, got {_tname(vnode)} (quote it: \"...\")")
            continue
        out[key] = str(v)
    return out


# Per-host field parsers: (value node, where, problems) -> value or None on error.
_HOST_FIELDS: dict[str, Callable[[Node, str, _Problems], Any]] = {
    "device": lambda n, w, p: _choice(n, w, p, DEVICES),
    "ssh_user": lambda n, w, p: _str(n, w, p),
    "ssh_port": lambda n, w, p: _int(n, w, p, 1, 65535),
    "ssh_options": _str_list,
    "batch_size": lambda n, w, p: _int(n, w, p, 1),
    "batch_sizes": lambda n, w, p: _int_list(n, w, p, 1),
    "env": _env,
    "python": lambda n, w, p: _str(n, w, p),
    "venv": lambda n, w, p: _str(n, w, p),
    "workdir": lambda n, w, p: _str(n, w, p),
    "log_dir": lambda n, w, p: _str(n, w, p),
}


def _gpus(node: Node, where: str, p: _Problems) -> tuple[int, ...] | None:
    if isinstance(node, SequenceNode):
        ids = _int_list(node, where, p, 0)
        if ids is None:
            return None
        if len(set(ids)) != len(ids):
            p.add(node, where, f"GPU ids repeat: {ids}")
            return None
        return tuple(ids)
    v = _scalar(node) if isinstance(node, ScalarNode) else None
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            p.add(node, where, f"a GPU count must be >= 1, got {v}")
            return None
        return tuple(range(v))
    p.add(node, where, f"expected a list of GPU ids ([0, 1]) or a count (2), got {_tname(node)}")
    return None


def _host(node: Node, index: int, defaults: dict[str, Any], p: _Problems) -> Host | None:
    where = f"hosts[{index}]"
    if not isinstance(node, MappingNode):
        p.add(node, where, f"expected a mapping (name, address, gpus, ...), got {_tname(node)}")
        return None
    keys = _mapping(node, where, HOST_KEYS, p)
    n_before = len(p.items)
    vals: dict[str, Any] = {}
    for key, (_, vnode) in keys.items():
        kwhere = f"{where}.{key}"
        if key == "name":
            vals[key] = _str(vnode, kwhere, p, _NAME_RE, "host name (letters, digits, '_', '.', '-')")
        elif key == "address":
            vals[key] = _str(vnode, kwhere, p)
            if vals[key] and (vals[key].startswith("-") or any(c.isspace() for c in vals[key])):
                p.add(vnode, kwhere, f"{vals[key]!r} is not a host address")
        elif key == "gpus":
            vals[key] = _gpus(vnode, kwhere, p)
        else:
            vals[key] = _HOST_FIELDS[key](vnode, kwhere, p)
    for req in ("name", "address", "gpus"):
        if req not in keys:
            p.add(node, where, f"missing required key '{req}'")
    if "python" in keys and "venv" in keys:
        p.add(keys["venv"][0], f"{where}.venv", "set either 'python' or 'venv', not both")
    if "batch_size" in keys and "batch_sizes" in keys:
        p.add(keys["batch_sizes"][0], f"{where}.batch_sizes", "set either 'batch_size' or 'batch_sizes', not both")
    if len(p.items) > n_before:
        return None

    merged = {k: v for k, v in defaults.items() if k not in ("python", "venv") or
              ("python" not in vals and "venv" not in vals)}
    merged.update({k: v for k, v in vals.items() if k != "env"})
    env = dict(defaults.get("env", {}))
    env.update(vals.get("env", {}))
    gpus = vals["gpus"]
    if "batch_sizes" in vals:
        bs: tuple[int, ...] | None = tuple(vals["batch_sizes"])
        if len(bs) != len(gpus):
            p.add(keys["batch_sizes"][1], f"{where}.batch_sizes",
                  f"{len(bs)} batch sizes for {len(gpus)} GPUs (one per GPU, in 'gpus' order)")
            return None
    elif "batch_size" in merged:
        bs = (merged["batch_size"],) * len(gpus)
    else:
        bs = None
    python = merged.get("python")
    if merged.get("venv"):
        python = merged["venv"].rstrip("/") + "/bin/python"
    return Host(
        name=vals["name"], address=vals["address"], gpus=gpus, batch_sizes=bs,
        ssh_user=merged.get("ssh_user"), ssh_port=merged.get("ssh_port"),
        ssh_options=tuple(merged.get("ssh_options") or ()), env=env, python=python,
        workdir=merged.get("workdir"), log_dir=merged.get("log_dir"), device=merged.get("device") or "auto",
        line=node.start_mark.line + 1,
    )


def parse_hosts(text: str, path: str = "hosts.yaml") -> HostsFile:
    """Validate hosts.yaml text; raise HostsError listing every problem with its line."""
    p = _Problems(path)
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
    top = _mapping(root, "", GLOBAL_KEYS, p)

    defaults: dict[str, Any] = {}
    if "defaults" in top:
        for key, (_, vnode) in _mapping(top["defaults"][1], "defaults", DEFAULT_KEYS, p).items():
            v = _HOST_FIELDS[key](vnode, f"defaults.{key}", p)
            if v is not None:
                defaults[key] = v
        if "python" in defaults and "venv" in defaults:
            p.add(top["defaults"][1], "defaults", "set either 'python' or 'venv', not both")

    hosts: list[Host] = []
    if "hosts" not in top:
        p.add(root, "", "missing required key 'hosts' (a list of hosts)")
    else:
        hnode = top["hosts"][1]
        if not isinstance(hnode, SequenceNode) or not hnode.value:
            p.add(hnode, "hosts", f"expected a non-empty list of hosts, got {_tname(hnode)}")
        else:
            for i, n in enumerate(hnode.value):
                h = _host(n, i, defaults, p)
                if h is not None:
                    hosts.append(h)

    g: dict[str, Any] = {}
    parsers: dict[str, Callable[[Node, str], Any]] = {
        "main_address": lambda n, w: _str(n, w, p),
        "main_port": lambda n, w: _int(n, w, p, 1, 65535),
        "rendezvous": lambda n, w: _choice(n, w, p, RENDEZVOUS),
        "rdzv_id": lambda n, w: _str(n, w, p, _NAME_RE, "rendezvous id (letters, digits, '_', '.', '-')"),
        "backend": lambda n, w: _choice(n, w, p, BACKENDS),
        "precision": lambda n, w: _choice(n, w, p, PRECISIONS),
    }
    for key, parse in parsers.items():
        if key in top:
            g[key] = parse(top[key][1], key)

    seen: dict[str, Host] = {}
    for h in hosts:
        if h.name in seen:
            p.items.append((h.line, f"hosts: duplicate host name '{h.name}' (first on line {seen[h.name].line})"))
        seen.setdefault(h.name, h)
    by_address: dict[str, Host] = {}
    for h in hosts:  # one machine listed twice (the loopback example) must not share a GPU
        key = "local" if h.is_local else h.address
        other = by_address.get(key)
        if other is not None and set(other.gpus) & set(h.gpus):
            shared = sorted(set(other.gpus) & set(h.gpus))
            p.items.append((h.line, f"hosts: '{h.name}' and '{other.name}' are the same machine ({h.address}) "
                                    f"and both use GPU {','.join(map(str, shared))}: give them disjoint gpus ids"))
        by_address.setdefault(key, h)
    if hosts and not p.items:
        main = hosts[0]
        remote = [h for h in hosts[1:] if not h.is_local]
        main_address = g.get("main_address") or main.address
        if main.is_local and remote and main_address in LOCAL_ADDRESSES:
            where_node = top["main_address"][1] if "main_address" in top else root
            p.add(where_node, "main_address",
                  f"the first host '{main.name}' is {main.address} but '{remote[0].name}' is remote: set "
                  f"main_address to the first host's address as the other hosts reach it (e.g. its LAN IP)")
    p.raise_if_any()
    return HostsFile(
        path=path, hosts=tuple(hosts), main_address=g.get("main_address") or hosts[0].address,
        **{k: v for k, v in g.items() if k != "main_address" and v is not None},
    )


def load_hosts(path: str | Path) -> HostsFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HostsError(f"{path}: cannot read: {e.strerror}") from None
    return parse_hosts(text, str(path))
