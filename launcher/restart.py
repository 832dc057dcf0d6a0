"""`launcher run --max-restarts N`: restart the whole job from its latest checkpoint after a failure.

One attempt = one start of every host (launcher/run.py). When a host fails, run.py has already
stopped every host (no orphans); then this loop records what was lost, waits `--restart-delay`,
checks that every host is reachable (doctor's `ssh ... true`) and starts again with `--resume`.
With `--drop-failed-hosts K` a host that is unreachable, or that failed its last K starts, is left
out: the trainer then resumes elastically on the remaining hosts, with their hosts.yaml batch
sizes. The first host holds the run dir and the rendezvous, so it is never dropped.

Every event goes to `RUN_DIR/launcher_events.jsonl` (one JSON object per line, each line one
O_APPEND write, so a reader never sees half a line), and a summary table is printed at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.hosts import HostsFile
from launcher.plan import Target, build_plan
from launcher.run import Interrupted, run_hosts

EVENTS_FILE = "launcher_events.jsonl"
DEFAULT_DROP_AFTER = 2   # --drop-failed-hosts without K: a host that failed its last 2 starts


# -- the run dir: where the job stands ----------------------------------------------------------
def run_dir_from_args(train_args: list[str], workdir: str | None) -> Path:
    """The trainer's run dir: `--out DIR` (or `--out=DIR`), else runs/<config stem>, in `workdir`."""
    out = None
    for i, a in enumerate(train_args):
        if a == "--out" and i + 1 < len(train_args):
            out = train_args[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    if out is None:
        config = next((train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == "--config"), "run")
        out = str(Path("runs") / Path(config).stem)
    return Path(workdir or ".") / out


def checkpoint_step(run_dir: Path) -> int:
    """Step of the latest complete checkpoint (a `step_N/trainer.pth` whose folder was renamed into place)."""
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name[5:].isdigit() and (p / "trainer.pth").is_file()]
    return max(steps, default=0)


def reached_step(run_dir: Path, since: float = 0.0) -> int:
    """The last step the run is known to have finished: its checkpoints, metrics.jsonl and
    samples.jsonl rows (only files modified after `since`, a time.time())."""
    last = checkpoint_step(run_dir) if since == 0.0 else 0
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        try:
            if path.stat().st_mtime >= since:
                last = max(last, _last_step(path))
        except OSError:
            continue
    return last


def _last_step(path: Path, tail: int = 1 << 16) -> int:
    """`step` of the last complete row; rows are appended in step order, so only the tail is read
    (samples.jsonl grows by one row per rank and step)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue  # a line being written right now, or the cut first line of the tail
    return 0


# -- events -------------------------------------------------------------------------------------
class EventLog:
    """Appends one JSON line per event; each line is a single O_APPEND write (atomic on a local disk)."""

    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict[str, Any]] = []

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": round(time.time(), 3), "event": kind, **fields}
        self.events.append(event)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(event) + "\n").encode())
        finally:
            os.close(fd)
        return event


@dataclass
class Attempt:
    index: int
    hosts: list[str]
    world_size: int
    started: float
    resume_step: int
    ended: float | None = None
    failed_host: str | None = None
    rc: int | None = None
    checkpoint_step: int | None = None
    lost_steps: int | None = None
    resumed_after: float | None = None     # seconds from the previous failure to this attempt's first new step
    reasons: list[str] = field(default_factory=list)


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class RestartPolicy:
    max_restarts: int = 0
    delay: float = 10.0
    drop_after: int | None = None          # None: never drop a host


def supervise(hosts: HostsFile, train_args: list[str], target: Target, policy: RestartPolicy, *,
              grace: float = 10.0, run_dir: Path | None = None, out=None, err=None) -> int:
    """Run the job, restarting up to `policy.max_restarts` times; 0 done, 1 failed, 130 interrupted."""
    from launcher.run import stop_signals

    if run_dir is None and hosts.hosts[0].is_local:
        run_dir = run_dir_from_args(train_args, hosts.hosts[0].workdir)
    s = _Supervisor(hosts, train_args, target, policy, grace, run_dir, out, err or sys.stderr)
    with stop_signals():
        try:
            return s.run()
        except (KeyboardInterrupt, Interrupted):
            s.log.add("interrupted")
            return s.finish(130)


class _Supervisor:
    """The state of one `launcher run`: its attempts, each host's start history, the event log."""

    def __init__(self, hosts, train_args, target, policy, grace, run_dir, out, err):
        self.hosts, self.train_args, self.target, self.policy = hosts, train_args, target, policy
        self.grace, self.run_dir, self.out, self.err = grace, run_dir, out, err
        # a remote first host holds the run dir: the events go to the same path here, progress is unknown
        self.log = EventLog((run_dir or run_dir_from_args(train_args, None)) / EVENTS_FILE)
        self.history: dict[str, list[bool]] = {h.name: [] for h in hosts.hosts}  # per host: failed? per start
        self.attempts: list[Attempt] = []
        self.restarts = 0

    def run(self) -> int:
        layout, failure_time = self.hosts, None
        while True:
            outcome = self.start(layout, failure_time)
            if outcome.code == 0:
                self.log.add("done", attempt=len(self.attempts) - 1, step=self._reached())
                return self.finish(0)
            failure_time = outcome.detected or time.time()
            self.record_failure(outcome, failure_time)
            before, layout = layout, self.next_layout(layout, outcome)
            if layout is None:
                return self.finish(1)
            if layout is not before:
                from launcher.plan import describe
                self.say("new layout:\n" + "\n".join(describe(layout)))
            self.log.add("restart", restart=self.restarts, cause=f"host {outcome.host} exited with code {outcome.rc}",
                         reasons=self.attempts[-1].reasons,
                         downtime_s=round(time.time() - failure_time, 3), hosts=[h.name for h in layout.hosts],
                         world_size=layout.world_size)

    def start(self, layout: HostsFile, failure_time: float | None):
        """One start of every host in `layout` (with --resume after the first); its Outcome."""
        args = list(self.train_args)
        if self.attempts and "--resume" not in args:
            args.append("--resume")
        resume_step = checkpoint_step(self.run_dir) if self.run_dir is not None and self.attempts else 0
        a = Attempt(len(self.attempts), [h.name for h in layout.hosts], layout.world_size, time.time(), resume_step)
        self.attempts.append(a)
        self.log.add("start", attempt=a.index, hosts=a.hosts, world_size=a.world_size, resume_step=resume_step)
        tick = _progress_watch(a, self.run_dir, failure_time, self.log)
        outcome = run_hosts(build_plan(layout, args, self.target), self.grace, self.out, self.err, on_tick=tick)
        a.ended = time.time()
        for h in layout.hosts:
            self.history[h.name].append(h.name == outcome.host)
        return outcome

    def record_failure(self, outcome, detected: float) -> None:
        a = self.attempts[-1]
        a.failed_host, a.rc = outcome.host, outcome.rc
        reached = self._reached()
        a.checkpoint_step = checkpoint_step(self.run_dir) if self.run_dir is not None else None
        a.lost_steps = None if reached is None else reached - a.checkpoint_step
        self.log.add("failure", attempt=a.index, host=outcome.host, exit_code=outcome.rc, detected=round(detected, 3),
                     last_line=outcome.last_line[-300:], reached_step=reached, checkpoint_step=a.checkpoint_step,
                     lost_steps=a.lost_steps)

    def next_layout(self, layout: HostsFile, outcome) -> HostsFile | None:
        """Wait, check the hosts, choose who starts next; None when the run must stop."""
        a, policy = self.attempts[-1], self.policy
        while True:  # several rounds when hosts are unreachable and may not be left out
            if self.restarts >= policy.max_restarts:
                self.log.add("give_up", reason=f"{self.restarts} restart(s) used of --max-restarts {policy.max_restarts}")
                return None
            self.restarts += 1
            self.say(f"restart {self.restarts}/{policy.max_restarts} in {policy.delay:g} s (host {outcome.host} "
                     f"failed with exit code {outcome.rc}; {_lost(a.lost_steps)} since checkpoint step "
                     f"{a.checkpoint_step})")
            time.sleep(policy.delay)
            nxt, reasons, fatal = _next_layout(self.hosts, layout, self.history, policy)
            for r in reasons:
                self.say(r)
            a.reasons += reasons
            if fatal:
                self.log.add("give_up", reason=fatal, reasons=reasons)
                self.say(fatal)
                return None
            if nxt is not None:
                return nxt
            self.log.add("unreachable", restart=self.restarts, reasons=reasons)

    def say(self, msg: str) -> None:
        self.err.write(f"launcher: {msg}\n")
        self.err.flush()

    def _reached(self) -> int | None:
        return reached_step(self.run_dir) if self.run_dir is not None else None

    def finish(self, code: int) -> int:
        return _finish(self.attempts, self.log, code, self.err, self.policy)


def _keep(hosts: HostsFile, names: list[str]) -> HostsFile:
    return dataclasses.replace(hosts, hosts=tuple(h for h in hosts.hosts if h.name in names))


def _next_layout(hosts: HostsFile, layout: HostsFile, history: dict[str, list[bool]],
                 policy: RestartPolicy) -> tuple[HostsFile | None, list[str], str | None]:
    """(hosts for the next start or None to wait again, reasons, fatal message or None)."""
    from launcher.doctor import unreachable

    reasons, drop = [], []
    for h in layout.hosts:
        error = unreachable(h)
        failed = history[h.name]
        k = policy.drop_after
        if error is not None:
            reasons.append(f"host {h.name} is unreachable: {error}")
            drop.append(h.name)
        elif k is not None and len(failed) >= k and all(failed[-k:]):
            reasons.append(f"host {h.name} failed its last {k} start(s)")
            drop.append(h.name)
    if not drop:
        return layout, reasons, None
    if hosts.hosts[0].name in drop:
        return None, reasons, (f"the first host {hosts.hosts[0].name} holds the run dir and the rendezvous and "
                               f"cannot be left out; fix it and run again with --resume")
    if policy.drop_after is None:
        return None, reasons + ["pass --drop-failed-hosts to continue without it"], None
    kept = _keep(hosts, [h.name for h in layout.hosts if h.name not in drop])
    reasons.append(f"continuing without {', '.join(drop)}: world size {layout.world_size} -> {kept.world_size}")
    return kept, reasons, None


def _progress_watch(a: Attempt, run_dir: Path | None, failure_time: float | None, log: EventLog):
    """A tick callback: notes when a restarted attempt finishes its first step past the checkpoint."""
    if run_dir is None or failure_time is None:
        return None

    def tick() -> None:
        if a.resumed_after is None and reached_step(run_dir, since=a.started) > a.resume_step:
            a.resumed_after = time.time() - failure_time
            log.add("resumed", attempt=a.index, step=reached_step(run_dir, since=a.started), recovery_s=round(a.resumed_after, 3))
    return tick


def _lost(n: int | None) -> str:
    return "lost steps unknown" if n is None else f"{n} step(s) lost"


def _finish(attempts: list[Attempt], log: EventLog, code: int, err, policy: RestartPolicy) -> int:
    """The summary table (when restarts were allowed), then the exit code."""
    if policy.max_restarts > 0:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="launcher run: attempts")
        for col in ("#", "hosts", "world", "from step", "ran s", "result", "lost steps", "back after s"):
            t.add_column(col)
        for a in attempts:
            result = "ok" if a.failed_host is None and a.ended else (
                f"{a.failed_host} exit {a.rc}" if a.failed_host else "interrupted")
            t.add_row(str(a.index), ",".join(a.hosts), str(a.world_size), str(a.resume_step),
                      f"{(a.ended or time.time()) - a.started:.1f}", result,
                      "" if a.lost_steps is None else str(a.lost_steps),
                      "" if a.resumed_after is None else f"{a.resumed_after:.1f}")
        Console(file=err, width=140).print(t)
    log.add("exit", code=code, attempts=len(attempts))
    return code
