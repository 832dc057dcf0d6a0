"""`launcher run`: start every host's torchrun, stream their logs, stop them all as one.

Each host command (launcher/plan.py) is started as a list of arguments in its own session
(`start_new_session=True`), so the launcher can signal the whole process group; torchrun starts
its workers in sessions of their own, so the launcher also snapshots each host's process tree
(psutil) before signalling and SIGKILLs whatever survives the grace period. A remote host is an
`ssh -tt` child: ending it hangs up the remote torchrun, which stops its workers (SIGHUP).

Output of every host is merged (stdout + stderr) and printed line by line as
`HOST | [rankR]: ...` (torchrun adds the rank prefix, the launcher the host). The first host to
exit non-zero stops the others (SIGTERM, then SIGKILL after --grace seconds); the launcher then
exits 1 and shows that host's last lines. Ctrl-C (or SIGTERM/SIGHUP to the launcher) stops all
hosts the same way and exits 130.
"""
from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from launcher.plan import HostCommand

TAIL_LINES = 40


@dataclass
class _Host:
    cmd: HostCommand
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    pump: threading.Thread | None = None
    known: dict[int, psutil.Process] = field(default_factory=dict)  # every process seen in its tree

    def snapshot(self) -> None:
        for p in _tree(self.proc.pid):
            self.known.setdefault(p.pid, p)


class Interrupted(Exception):
    pass


def _pump(h: _Host, width: int, lock: threading.Lock, out) -> None:
    prefix = f"{h.cmd.host.name:<{width}} | "
    for raw in iter(h.proc.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
        h.tail.append(line)
        with lock:
            out.write(prefix + line + "\n")
            out.flush()


def _start(cmd: HostCommand) -> subprocess.Popen:
    env = os.environ.copy()
    env.update(cmd.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        cmd.argv, cwd=cmd.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_all(hosts: list[_Host], grace: float) -> None:
    """SIGTERM every live host's process group; SIGKILL its whole tree after `grace` seconds.

    The tree includes every process ever seen under the host (workers live in their own
    sessions and outlive a killed torchrun as orphans, so the process group alone is not enough).
    """
    for h in hosts:
        h.snapshot()
    live = [h for h in hosts if h.proc.poll() is None]
    procs = [p for h in hosts for p in h.known.values() if p.pid != h.proc.pid]
    for p in procs:  # workers get SIGTERM too: torchrun forwards it, but may already be gone
        with _suppress():
            p.terminate()
    for h in live:
        with _suppress():
            os.killpg(h.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for h in live:
            h.proc.poll()
        if all(h.proc.returncode is not None for h in live) and not any(_alive(p) for p in procs):
            return
        time.sleep(0.1)
    for h in live:
        with _suppress():
            os.killpg(h.proc.pid, signal.SIGKILL)
    for p in procs + [c for p in procs if _alive(p) for c in _children(p)]:
        if _alive(p):
            with _suppress():
                p.kill()
    for h in live:
        with _suppress():
            h.proc.wait(timeout=5)


def _suppress():
    """Ignore a process that is already gone (or was never ours)."""
    return contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error, subprocess.TimeoutExpired)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


@dataclass(frozen=True)
class Outcome:
    """How one start of every host ended: code 0 (all exited 0), 1 (a host failed), 130 (interrupted)."""

    code: int
    host: str | None = None        # the host that failed first
    rc: int | None = None          # its exit code
    detected: float | None = None  # time.time() when the launcher saw the failure
    last_line: str = ""            # the failing host's last output line


@contextlib.contextmanager
def stop_signals():
    """SIGTERM/SIGHUP to the launcher raise Interrupted (like Ctrl-C) so hosts are stopped first.

    SIGINT raises KeyboardInterrupt and all three are unblocked, also when the launcher was
    started with them ignored or blocked (both are inherited from the parent: a background job, a
    test runner's worker), or a Ctrl-C would never stop the hosts."""
    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old, mask = {}, None
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, on_signal)
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_commands(cmds: list[HostCommand], grace: float = 10.0, out=None, err=None) -> int:
    """Run all host commands to completion; 0 when every host exits 0, 1 on failure, 130 on interrupt."""
    with stop_signals():
        try:
            return run_hosts(cmds, grace, out, err).code
        except (KeyboardInterrupt, Interrupted):
            return 130


def run_hosts(cmds: list[HostCommand], grace: float = 10.0, out=None, err=None,
              on_tick: Callable[[], None] | None = None) -> Outcome:
    """One start of every host; stops them all on the first failure. `on_tick` runs about once a second.

    A Ctrl-C / Interrupted stops every host and is re-raised (the caller decides the exit code).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    width = max(len(c.host.name) for c in cmds)
    lock = threading.Lock()
    exits: queue.Queue = queue.Queue()
    hosts: list[_Host] = []
    try:
        for cmd in cmds:
            try:
                proc = _start(cmd)
            except OSError as e:
                err.write(f"launcher: cannot start host {cmd.host.name}: {cmd.argv[0]}: {e.strerror or e} "
                          f"(check python/venv/workdir in hosts.yaml, or `ssh` on PATH)\n")
                stop_all(hosts, grace)
                return Outcome(1, cmd.host.name, None, time.time(), f"cannot start: {e.strerror or e}")
            h = _Host(cmd, proc)
            hosts.append(h)
            h.pump = threading.Thread(target=_pump, args=(h, width, lock, out), daemon=True)
            h.pump.start()
            threading.Thread(target=lambda h=h: exits.put((h, h.proc.wait())), daemon=True).start()
        remaining = len(hosts)
        while remaining:
            try:
                h, rc = exits.get(timeout=1.0)
            except queue.Empty:
                for h in hosts:
                    h.snapshot()
                if on_tick is not None:
                    on_tick()
                continue
            remaining -= 1
            if rc != 0:
                detected = time.time()
                with lock:
                    err.write(f"launcher: host {h.cmd.host.name} (node {h.cmd.node_rank}) exited with code "
                              f"{rc}; stopping the other hosts\n")
                    err.flush()
                stop_all(hosts, grace)
                _join(hosts)
                _report_failure(h, rc, err)
                return Outcome(1, h.cmd.host.name, rc, detected, h.tail[-1] if h.tail else "")
        _join(hosts)
        return Outcome(0)
    except (KeyboardInterrupt, Interrupted) as e:
        with lock:
            err.write(f"\nlauncher: interrupted ({e or 'SIGINT'}); stopping all hosts\n")
            err.flush()
        stop_all(hosts, grace)
        _join(hosts)
        raise
    finally:
        stop_all(hosts, 0)  # never leave anything behind, whatever happened above


def _join(hosts: list[_Host]) -> None:
    for h in hosts:
        if h.pump is not None:
            h.pump.join(timeout=5)


def _report_failure(h: _Host, rc: int, err) -> None:
    """The failing host's last lines, uncropped (tracebacks are wide), under a red rule."""
    from rich.console import Console

    console = Console(file=err, soft_wrap=True, highlight=False)
    console.rule(f"[red]{h.cmd.host.name}: last {len(h.tail)} lines (exit code {rc})", align="left")
    for line in h.tail or ["(no output)"]:
        console.out(line, highlight=False)
    console.rule(style="red")


def add_arguments(parser) -> None:
    from launcher.plan import add_target_arguments
    from launcher.restart import DEFAULT_DROP_AFTER

    parser.add_argument("hosts", help="hosts.yaml")
    add_target_arguments(parser)
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping hosts (default 10)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="after a failure, stop every host and start again with --resume, up to N times "
                             "(default 0; docs/fault_tolerance.md)")
    parser.add_argument("--restart-delay", type=float, default=10.0, metavar="S",
                        help="seconds to wait before a restart (default 10)")
    parser.add_argument("--drop-failed-hosts", type=int, nargs="?", const=DEFAULT_DROP_AFTER, default=None,
                        metavar="K", help="leave out hosts that are unreachable or failed their last K starts "
                                          f"(default K {DEFAULT_DROP_AFTER}); the run continues on the rest")


def run(args) -> int:
    from launcher.hosts import HostsError, load_hosts
    from launcher.plan import build_plan, describe, target_from_args
    from launcher.restart import RestartPolicy, supervise

    if args.max_restarts < 0 or args.restart_delay < 0 or (args.drop_failed_hosts is not None
                                                            and args.drop_failed_hosts < 1):
        raise HostsError("--max-restarts and --restart-delay must be >= 0, --drop-failed-hosts K >= 1")
    hosts = load_hosts(args.hosts)
    build_plan(hosts, args.train_args, target_from_args(args))  # fail on a bad plan before starting anything
    print("\n".join(describe(hosts)), flush=True)
    policy = RestartPolicy(args.max_restarts, args.restart_delay, args.drop_failed_hosts)
    return supervise(hosts, args.train_args, target_from_args(args), policy, grace=args.grace)
