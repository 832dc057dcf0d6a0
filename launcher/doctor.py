"""`launcher doctor`: check every host before a long run, one table row per check, each with a fix.

Facts are gathered by running one small python program (`PROBE`, passed as a literal `-c`
argument) with each host's own python, in its workdir and with its CUDA_VISIBLE_DEVICES: locally
as a subprocess, remotely through `ssh -o BatchMode=yes -o ConnectTimeout=5` after a
`ssh ... true` reachability check. The verdicts are a pure function of those facts
(`evaluate`), compared against the first (main) host: same commit, same package versions (the
`+cuXXX` local part of torch/torchvision may differ: older GPUs need other wheels), every GPU
covered by the torch arch list (fashionseg.model.gpu), enough free disk, the same shards
manifest (sha256 of manifest.json), the rendezvous port free on the main host and reachable from
the others (while doctor runs, a local main host listens on it).
"""
from __future__ import annotations

import concurrent.futures
import json
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from launcher.hosts import Host, HostsFile
from fashionseg.model.gpu import arch_supported, install_command  # one set of rules, shared with the trainer
from launcher.plan import host_env, remote_command

PACKAGES = ("torch", "torchvision", "accelerate", "fashionseg", "webdataset", "pycocotools", "numpy")
MARKER = "FASHIONSEG_DOCTOR "

# Runs on every host (any python >= 3.8); prints one JSON line after MARKER.
PROBE = r'''
import hashlib, json, os, shutil, socket, subprocess, sys
a = json.loads(sys.argv[1])
r = {"python": sys.version.split()[0], "cwd": os.getcwd()}
try:
    p = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
    r["commit"] = p.stdout.strip() if p.returncode == 0 else None
    if r["commit"]:
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=20)
        r["dirty"] = bool(d.stdout.strip())
except Exception as e:
    r["commit"] = None
from importlib import metadata
r["packages"] = {}
for name in a["packages"]:
    try:
        r["packages"][name] = metadata.version(name)
    except Exception:
        r["packages"][name] = None
try:
    import torch
    r["torch_cuda"] = torch.version.cuda
    r["cuda"] = torch.cuda.is_available()
    if r["cuda"]:
        n = torch.cuda.device_count()
        r["gpus"] = [[torch.cuda.get_device_name(i), list(torch.cuda.get_device_capability(i))] for i in range(n)]
        r["arch_list"] = torch.cuda.get_arch_list()
except Exception as e:
    r["torch_error"] = repr(e)
r["disk_free"] = shutil.disk_usage(".").free
if a.get("shards"):
    m = os.path.join(a["shards"], "manifest.json")
    if os.path.isfile(m):
        h = hashlib.sha256()
        with open(m, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        r["manifest_sha256"] = h.hexdigest()
    else:
        r["manifest_sha256"] = None
if a.get("bind_port"):
    s = socket.socket()
    try:
        s.bind(("", a["bind_port"]))
        r["port_free"] = True
    except OSError as e:
        r["port_free"] = False
        r["port_error"] = str(e)
    finally:
        s.close()
if a.get("connect"):
    host, port = a["connect"]
    try:
        socket.create_connection((host, port), timeout=5).close()
        r["port_open"] = True
    except OSError as e:
        r["port_open"] = False
        r["port_error"] = str(e)
print("FASHIONSEG_DOCTOR " + json.dumps(r), flush=True)
'''


@dataclass(frozen=True)
class Row:
    host: str
    check: str
    status: str          # "ok" | "warn" | "FAIL"
    detail: str
    fix: str = ""


# -- gathering facts ---------------------------------------------------------------------------
def _ssh_base(host: Host) -> list[str]:
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    if host.ssh_port is not None:
        argv += ["-p", str(host.ssh_port)]
    if host.ssh_user is not None:
        argv += ["-l", host.ssh_user]
    return argv + list(host.ssh_options) + [host.address]


def _ssh_target(host: Host) -> str:
    user = f"{host.ssh_user}@" if host.ssh_user else ""
    port = f" -p {host.ssh_port}" if host.ssh_port else ""
    return f"{port} {user}{host.address}".strip()


def probe_command(host: Host, args: dict[str, Any]) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, extra env, cwd) that runs PROBE on `host`."""
    return host_command(host, ["-c", PROBE, json.dumps(args)])


def host_command(host: Host, python_args: list[str]) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, extra env, cwd) that runs `<host's python> PYTHON_ARGS` on `host` in its workdir with
    its environment (ssh without a tty for remote hosts)."""
    python = host.python or (sys.executable if host.is_local else "python3")
    argv = [python, *python_args]
    env = host_env(host)
    if host.is_local:
        return argv, env, host.workdir
    return _ssh_base(host) + [remote_command(argv, env, host.workdir)], {}, None


def unreachable(host: Host, timeout: float = 30) -> str | None:
    """Why `host` cannot be reached (`ssh ... true` fails), or None: the reachability check of doctor.

    `launcher run --max-restarts` calls it before every restart."""
    if host.is_local:
        return None
    try:
        p = subprocess.run(_ssh_base(host) + ["true"], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return None


def gather(host: Host, args: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    """Facts about one host; {"reachable": False, "error": ...} when it cannot be asked."""
    import os

    error = unreachable(host)
    if error is not None:
        return {"reachable": False, "error": error}
    argv, env, cwd = probe_command(host, args)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"reachable": True, "error": f"cannot run {argv[0]}: {e}"}
    for line in p.stdout.splitlines():
        if line.startswith(MARKER):
            return {"reachable": True, **json.loads(line[len(MARKER):])}
    tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"reachable": True, "error": f"probe failed: {tail}"}


def gather_all(hosts: HostsFile, shards: str | None, packages: tuple[str, ...]) -> list[dict[str, Any]]:
    """Facts of every host; while the others are probed, a local main host listens on main_port."""
    main = hosts.hosts[0]
    base = {"packages": list(packages), "shards": shards}
    listener = None
    main_facts = gather(main, {**base, "bind_port": hosts.main_port})
    if main.is_local and main_facts.get("port_free"):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("", hosts.main_port))
        listener.listen(16)
    try:
        rest = {**base, "connect": [hosts.main_address, hosts.main_port]} if listener else base
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            others = list(pool.map(lambda h: gather(h, rest), hosts.hosts[1:]))
    finally:
        if listener is not None:
            listener.close()
    return [main_facts] + others


# -- verdicts (pure) ---------------------------------------------------------------------------
def _base_version(v: str | None) -> str | None:
    return v.split("+")[0] if v else v


def evaluate(hosts: HostsFile, facts: list[dict[str, Any]], min_free_gb: float = 20.0,
             shards: str | None = None) -> list[Row]:
    """One Row per (host, check); facts[0] is the main host, the reference for the comparisons."""
    rows: list[Row] = []
    ref = facts[0] if "error" not in facts[0] and facts[0].get("reachable", True) else {}
    ref_pkgs = ref.get("packages", {})
    for i, (host, f) in enumerate(zip(hosts.hosts, facts)):
        add = lambda check, status, detail, fix="": rows.append(Row(host.name, check, status, detail, fix))  # noqa: E731
        python = host.python or ("this python" if host.is_local else "python3")
        if not f.get("reachable", True):
            add("reachable", "FAIL", f.get("error", ""), f"check the address, then `ssh-copy-id {_ssh_target(host)}` "
                f"so `ssh -o BatchMode=yes {_ssh_target(host)} true` works without a password")
            continue
        add("reachable", "ok", "local" if host.is_local else f"ssh {_ssh_target(host)}")
        if "error" in f:
            add("probe", "FAIL", f["error"], f"check that {python} exists in {host.workdir or 'the login dir'} on "
                f"{host.name} (hosts.yaml python/venv/workdir)")
            continue
        # code
        if f.get("commit") is None:
            add("commit", "warn", f"{f.get('cwd')}: not a git checkout (or no commit yet)",
                "clone the repository into workdir to let doctor compare code")
        elif i > 0 and ref.get("commit") and f["commit"] != ref["commit"]:
            add("commit", "FAIL", f"{f['commit'][:12]} != main {str(ref.get('commit'))[:12]}",
                f"cd {host.workdir or '~'} && git fetch && git checkout {ref.get('commit')}")
        else:
            add("commit", "warn" if f.get("dirty") else "ok", f["commit"][:12] + (" (uncommitted changes)" if
                f.get("dirty") else ""), "commit or stash local changes" if f.get("dirty") else "")
        diffs = [f"{k} {v} != {ref_pkgs.get(k)}" for k, v in f["packages"].items()
                 if i > 0 and ref_pkgs and _base_version(v) != _base_version(ref_pkgs.get(k))]
        missing = [k for k, v in f["packages"].items() if v is None and k != "deepspeed"]
        if missing:
            add("packages", "FAIL", "missing: " + ", ".join(missing),
                f"{python} -m pip install -e '.[dev]' in {host.workdir or 'the checkout'}")
        elif diffs:
            pins = " ".join(f"{k}=={_base_version(ref_pkgs[k])}" for k, v in f["packages"].items()
                            if ref_pkgs.get(k) and _base_version(v) != _base_version(ref_pkgs[k])
                            and k != "fashionseg")
            add("packages", "FAIL", "; ".join(diffs), f"{python} -m pip install {pins}".strip())
        else:
            add("packages", "ok", f"python {f.get('python')}, torch {f['packages'].get('torch')}")
        # GPUs
        if "torch_error" in f:
            add("gpus", "FAIL", f"import torch failed: {f['torch_error']}", f"{python} -m pip install torch")
        elif not f.get("cuda"):
            add("gpus", "warn", f"no CUDA GPU visible: {host.nproc} CPU process(es) (gloo)",
                "expected on a CPU machine; otherwise check nvidia-smi and the driver")
        else:
            gpus = f.get("gpus", [])
            bad = [(n, tuple(c)) for n, c in gpus if not arch_supported(tuple(c), f.get("arch_list", []))]
            if len(gpus) < host.nproc:
                add("gpus", "FAIL", f"{len(gpus)} visible, hosts.yaml gpus lists {host.nproc}",
                    "fix `gpus` in hosts.yaml (ids as nvidia-smi numbers them)")
            elif bad:
                caps = sorted({c for _, c in bad})
                add("gpus", "FAIL", f"torch {f['packages'].get('torch')} has kernels for "
                    f"{' '.join(f.get('arch_list', []))}; not for " + ", ".join(f"{n} (sm_{c[0]}{c[1]})" for n, c in bad),
                    "; ".join(install_command(c) for c in caps))
            else:
                add("gpus", "ok", ", ".join(f"{n} (sm_{c[0]}{c[1]})" for n, c in gpus))
        # disk
        free_gb = f.get("disk_free", 0) / 1e9
        if free_gb < min_free_gb:
            add("disk", "FAIL", f"{free_gb:.1f} GB free in {f.get('cwd')} (< {min_free_gb:g} GB)",
                "free space (old checkpoints under runs/) or move workdir")
        else:
            add("disk", "ok", f"{free_gb:.0f} GB free")
        # shards
        if shards:
            sha, ref_sha = f.get("manifest_sha256"), ref.get("manifest_sha256")
            if sha is None:
                add("shards", "FAIL", f"{shards}/manifest.json not found",
                    f"rsync -a {shards}/ {_rsync_dest(host, shards)}" if i > 0 else
                    f"build them: shard build ... --out {shards}")
            elif i > 0 and ref_sha and sha != ref_sha:
                add("shards", "FAIL", f"manifest sha256 {sha[:12]} != main {str(ref_sha)[:12]}",
                    f"rsync -a --delete {shards}/ {_rsync_dest(host, shards)}")
            else:
                add("shards", "ok", f"manifest sha256 {sha[:12]}")
        # port
        if i == 0:
            if f.get("port_free") is False:
                add("port", "FAIL", f"port {hosts.main_port} in use: {f.get('port_error', '')}",
                    f"stop what holds it (`ss -ltnp 'sport = :{hosts.main_port}'`) or change main_port")
            else:
                add("port", "ok", f"{hosts.main_port} free")
        elif "port_open" in f:
            if f["port_open"]:
                add("port", "ok", f"reaches {hosts.main_address}:{hosts.main_port}")
            else:
                add("port", "FAIL", f"cannot reach {hosts.main_address}:{hosts.main_port}: {f.get('port_error', '')}",
                    f"open TCP {hosts.main_port} on the main host's firewall (and the NCCL/gloo ports: "
                    f"allow the LAN), or fix main_address")
        else:
            add("port", "warn", "not checked (the main host is remote or its port is busy)",
                "run doctor on the main host")
    return rows


def _rsync_dest(host: Host, shards: str) -> str:
    import posixpath

    path = shards if posixpath.isabs(shards) or not host.workdir else posixpath.join(host.workdir, shards)
    if host.is_local:
        return shlex.quote(path) + "/"
    user = f"{host.ssh_user}@" if host.ssh_user else ""
    ssh = f"-e 'ssh -p {host.ssh_port}' " if host.ssh_port else ""
    return f"{ssh}{user}{host.address}:{shlex.quote(path)}/"


def render(rows: list[Row], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="launcher doctor", show_lines=False)
    for col in ("host", "check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warn": "yellow", "FAIL": "bold red"}
    for r in rows:
        table.add_row(r.host, r.check, f"[{style[r.status]}]{r.status}[/]", r.detail, r.fix)
    Console(file=file, width=200 if file is not None else None).print(table)


def add_arguments(parser) -> None:
    parser.add_argument("hosts", help="hosts.yaml")
    parser.add_argument("--shards", default=None,
                        help="shard directory (relative to each host's workdir) whose manifest must match")
    parser.add_argument("--min-free-gb", type=float, default=20.0, help="free disk required in workdir (GB)")
    parser.add_argument("--json", action="store_true", help="print the facts and rows as JSON")


def run(args) -> int:
    from launcher.hosts import load_hosts

    hosts = load_hosts(args.hosts)
    packages = PACKAGES + (("deepspeed",) if hosts.backend == "deepspeed" else ())
    facts = gather_all(hosts, args.shards, packages)
    rows = evaluate(hosts, facts, args.min_free_gb, args.shards)
    if args.json:
        print(json.dumps({"facts": facts, "rows": [r.__dict__ for r in rows]}, indent=1))
    else:
        render(rows)
    failed = [r for r in rows if r.status == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0
