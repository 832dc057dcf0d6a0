"""The exact command each host runs: one torchrun per host, one shared rendezvous.

Every host gets `<python> -m torch.distributed.run --nnodes N --nproc-per-node n_i ...` with its
own n_i = len(gpus); torch's elastic agent assigns global ranks as the cumulative sum of the
per-node process counts, which is what makes uneven counts (2 + 5 + 3) work (docs/launcher.md).
With the default static rendezvous, node rank = position in hosts.yaml, so host 0 holds ranks
0..n_0-1 and hosts the TCPStore on main_address:main_port.

A local host (localhost / 127.0.0.1 / ::1) runs `argv` directly with `env` added and `cwd`;
a remote host runs `ssh ... HOST REMOTE_COMMAND`, where REMOTE_COMMAND is one string that
the remote login shell parses: every piece of it is `shlex.quote`d, so values from hosts.yaml
arrive literally (a `$(...)` stays text).
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

from fashionseg.names import LOCAL_BATCH_ENV
from launcher.hosts import Host, HostsFile

DEFAULT_MODULE = "fashionseg.train"
# Prefix torchrun puts on every line a worker prints (--tee 3); the launcher adds the host name.
LOG_PREFIX = "[rank${rank}]: "
SSH_BASE_OPTIONS = ("-o", "BatchMode=yes", "-tt")
# After the host's own ssh_options (ssh keeps the first value it reads, so a host can override them):
# a remote host whose network drops is noticed in ~15 s instead of TCP's minutes.
SSH_KEEPALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclass(frozen=True)
class Target:
    """What torchrun starts: a module (`-m`, the default fashionseg.train) or a script path."""

    module: str | None = DEFAULT_MODULE
    script: str | None = None

    def argv(self) -> list[str]:
        return ["-m", self.module] if self.script is None else [self.script]


@dataclass(frozen=True)
class HostCommand:
    host: Host
    node_rank: int
    ranks: range
    argv: list[str]                         # what the launcher executes on this machine
    env: dict[str, str] = field(default_factory=dict)  # added to os.environ (local hosts only)
    cwd: str | None = None                  # local hosts only
    remote_command: str | None = None       # the string ssh hands to the remote shell

    def display(self) -> str:
        """A copy-pasteable shell line equivalent to what `launcher run` executes."""
        cmd = shlex.join(self.argv)
        if self.env:
            cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " + cmd
        if self.cwd:
            cmd = f"cd {shlex.quote(self.cwd)} && {cmd}"
        return cmd


def train_overrides(hosts: HostsFile, train_args: list[str]) -> list[str]:
    """`train.backend=` / `train.precision=` from hosts.yaml, unless TRAIN_ARGS already set them."""
    out = []
    for key, value in (("train.backend", hosts.backend), ("train.precision", hosts.precision)):
        if value is not None and not any(a.startswith(key + "=") for a in train_args):
            out.append(f"{key}={value}")
    return out


def local_machine_has_gpu() -> bool:
    """An NVIDIA driver is loaded here (Linux device node; /dev/dxg under WSL). No torch import."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def uses_cpu(host: Host) -> bool:
    """`device: cpu`, or `auto` on a local host of a machine without GPUs: one CPU process per gpus entry."""
    return host.device == "cpu" or (host.device == "auto" and host.is_local and not local_machine_has_gpu())


def host_env(host: Host) -> dict[str, str]:
    """Environment the launcher sets for one host's torchrun (inherited by its workers)."""
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, host.gpus))}
    if uses_cpu(host):  # Accelerator forms a gloo CPU group only when told to (accelerate launch --cpu)
        env["ACCELERATE_USE_CPU"] = "true"
    if host.batch_sizes is not None:
        env[LOCAL_BATCH_ENV] = ",".join(map(str, host.batch_sizes))
    env.update(host.env)
    return env


def torchrun_argv(hosts: HostsFile, node_rank: int, target: Target, train_args: list[str]) -> list[str]:
    host = hosts.hosts[node_rank]
    python = host.python or (sys.executable if host.is_local else "python3")
    argv = [python, "-m", "torch.distributed.run",
            "--nnodes", str(len(hosts.hosts)), "--nproc-per-node", str(host.nproc)]
    if hosts.rendezvous == "static":
        argv += ["--rdzv-backend", "static", "--rdzv-id", hosts.rdzv_id, "--node-rank", str(node_rank),
                 "--master-addr", hosts.main_address, "--master-port", str(hosts.main_port)]
    else:  # c10d: ranks follow join order; the first host hosts the store (is_host, no guessing)
        argv += ["--rdzv-backend", "c10d", "--rdzv-id", hosts.rdzv_id,
                 "--rdzv-endpoint", f"{hosts.main_address}:{hosts.main_port}",
                 "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0}"]
    argv += ["--max-restarts", "0", "--tee", "3", "--log-line-prefix-template", LOG_PREFIX]
    if host.log_dir:
        argv += ["--log-dir", host.log_dir]
    return argv + target.argv() + list(train_args) + train_overrides(hosts, train_args)


def remote_command(argv: list[str], env: dict[str, str], cwd: str | None) -> str:
    """One POSIX-shell string: `cd DIR && exec env K=V ... ARGV`, every piece shlex.quoted."""
    parts = ["exec", "env"] + [f"{k}={v}" for k, v in env.items()] + argv
    cmd = " ".join(shlex.quote(p) for p in parts)
    return f"cd {shlex.quote(cwd)} && {cmd}" if cwd else cmd


def ssh_argv(host: Host, remote: str) -> list[str]:
    """ssh with a forced tty (-tt): closing it hangs up the remote torchrun, which stops its workers."""
    argv = ["ssh", *SSH_BASE_OPTIONS]
    if host.ssh_port is not None:
        argv += ["-p", str(host.ssh_port)]
    if host.ssh_user is not None:
        argv += ["-l", host.ssh_user]
    return argv + list(host.ssh_options) + list(SSH_KEEPALIVE) + [host.address, remote]


def build_plan(hosts: HostsFile, train_args: list[str], target: Target = Target()) -> list[HostCommand]:
    cmds = []
    for node_rank, (host, ranks) in enumerate(zip(hosts.hosts, hosts.rank_ranges())):
        argv = torchrun_argv(hosts, node_rank, target, train_args)
        env = host_env(host)
        if host.is_local:
            cmds.append(HostCommand(host, node_rank, ranks, argv, env=env, cwd=host.workdir))
        else:
            remote = remote_command(argv, env, host.workdir)
            cmds.append(HostCommand(host, node_rank, ranks, ssh_argv(host, remote), remote_command=remote))
    return cmds


def describe(hosts: HostsFile) -> list[str]:
    """Header lines: world size, rank layout and per-rank batch sizes."""
    lines = [f"# {hosts.path}: {len(hosts.hosts)} hosts, world size {hosts.world_size}, "
             f"rendezvous {hosts.rendezvous} at {hosts.main_address}:{hosts.main_port} (id {hosts.rdzv_id})"]
    for h, r in zip(hosts.hosts, hosts.rank_ranges()):
        bs = ",".join(map(str, h.batch_sizes)) if h.batch_sizes else "from config"
        where = ("local" if h.is_local else f"ssh {h.address}") + (", CPU processes" if uses_cpu(h) else "")
        lines.append(f"#   {h.name}: ranks {r.start}-{r.stop - 1}, gpus {','.join(map(str, h.gpus))}, "
                     f"batch sizes {bs}, {where}")
    return lines


def add_arguments(parser) -> None:
    parser.add_argument("hosts", help="hosts.yaml")
    add_target_arguments(parser)


def add_target_arguments(parser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-m", "--module", default=None, help=f"python module to run (default {DEFAULT_MODULE})")
    g.add_argument("--script", default=None, help="python script to run instead of a module")


def target_from_args(args) -> Target:
    if args.script:
        return Target(module=None, script=args.script)
    return Target(module=args.module or DEFAULT_MODULE)


def run(args) -> int:
    from launcher.hosts import load_hosts

    hosts = load_hosts(args.hosts)
    print("\n".join(describe(hosts)))
    for cmd in build_plan(hosts, args.train_args, target_from_args(args)):
        print(f"\n# {cmd.host.name} (node {cmd.node_rank})")
        print(cmd.display())
    return 0
