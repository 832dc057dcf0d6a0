"""`launcher run --max-restarts`: the restart loop, its events file and the choice of hosts.

The end-to-end tests use the tiny DDP script (tests/launcher_ddp_script.py) over loopback, where
node-b's rank exits 3 on every start; tests/test_drills.py breaks the real trainer from outside.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_launcher_run import loopback_hosts

from launcher.hosts import parse_hosts
from launcher.restart import (EventLog, RestartPolicy, _next_layout, checkpoint_step, reached_step,
                              run_dir_from_args)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "launcher_ddp_script.py"


def run_launcher(hosts: Path, out: Path, *opts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", "run", str(hosts), "--script", str(SCRIPT),
                           "--grace", "5", "--restart-delay", "0", *opts, "--", "--out", str(out), "--steps", "1",
                           "--die-rank", "1", "--die-step", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "launcher_events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_restarts_keep_the_layout_until_a_host_failed_k_times_then_run_on_without_it(tmp_path):
    """node-b's rank exits 3 on every start: restart 1 keeps both hosts (1 failure < K=2), restart 2
    leaves node-b out and the run finishes on node-a alone, with --resume."""
    out = tmp_path / "run"
    r = run_launcher(loopback_hosts(tmp_path, small=True), out, "--max-restarts", "2", "--drop-failed-hosts", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = events(out)
    assert [e["event"] for e in ev] == ["start", "failure", "restart", "start", "failure", "restart", "start",
                                        "done", "exit"]
    assert [e["world_size"] for e in ev if e["event"] == "start"] == [2, 2, 1]
    assert [e["host"] for e in ev if e["event"] == "failure"] == ["node-b", "node-b"]
    assert [e["exit_code"] for e in ev if e["event"] == "failure"] == [1, 1]
    assert ev[2]["reasons"] == [] and ev[5]["reasons"] == [
        "host node-b failed its last 2 start(s)", "continuing without node-b: world size 2 -> 1"]
    assert [e["cause"] for e in ev if e["event"] == "restart"] == ["host node-b exited with code 1"] * 2
    assert ev[6]["hosts"] == ["node-a"] and ev[-1]["code"] == 0
    assert "launcher: new layout:\n# " in r.stderr and "node-a: ranks 0-0" in r.stderr
    assert all(e["downtime_s"] >= 0 for e in ev if e["event"] == "restart")
    info = json.loads((out / "rank0.json").read_text())
    assert info["world"] == 1 and info["resume"] is True  # restarted alone, with --resume
    assert "launcher run: attempts" in r.stderr and r.stderr.count("node-b exit 1") == 2
    assert "launcher: restart 1/2 in 0 s (host node-b failed with exit code 1" in r.stderr


HOSTS = textwrap.dedent("""\
    main_address: 10.0.0.1
    hosts:
      - {name: main, address: localhost, gpus: 2, batch_size: 2}
      - {name: flaky, address: localhost, gpus: [2], batch_size: 4}
      - {name: gone, address: nowhere.invalid, gpus: 1, ssh_options: [-o, ConnectTimeout=2]}
    """)


def test_unreachable_and_repeatedly_failing_hosts_are_left_out_but_never_the_first():
    hosts = parse_hosts(HOSTS)
    history = {"main": [False, False], "flaky": [True, True], "gone": [False, False]}
    kept, reasons, fatal = _next_layout(hosts, hosts, history, RestartPolicy(3, 0, drop_after=2))
    assert fatal is None and [h.name for h in kept.hosts] == ["main"] and kept.world_size == 2
    assert reasons[0] == "host flaky failed its last 2 start(s)"
    assert reasons[1].startswith("host gone is unreachable: ")
    assert reasons[2] == "continuing without flaky, gone: world size 4 -> 2"
    # flaky failed once, then was fine: kept; without the flag an unreachable host means "wait"
    history["flaky"] = [True, False]
    kept, reasons, fatal = _next_layout(hosts, hosts, history, RestartPolicy(3, 0, drop_after=None))
    assert kept is None and fatal is None and reasons[-1] == "pass --drop-failed-hosts to continue without it"
    history["main"] = [True, True]
    kept, reasons, fatal = _next_layout(hosts, hosts, history, RestartPolicy(3, 0, drop_after=2))
    assert kept is None and "the first host main holds the run dir" in fatal


def test_run_dir_and_progress_come_from_the_run_folder(tmp_path):
    assert run_dir_from_args(["--config", "configs/debug.yaml", "--out", "runs/x"], "/w") == Path("/w/runs/x")
    assert run_dir_from_args(["--out=o"], None) == Path("o")
    assert run_dir_from_args(["--config", "c/r50.yaml"], None) == Path("runs/r50")  # the trainer's default
    run = tmp_path / "run"
    assert checkpoint_step(run) == 0 and reached_step(run) == 0
    for step, complete in ((4, True), (8, True), (12, False)):  # 12: no trainer.pth, i.e. not complete
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer.pth").write_bytes(b"x")
    (run / "checkpoints" / ".step_00000016.tmp").mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 11)) + '{"step": 1')
    assert checkpoint_step(run) == 8 and reached_step(run) == 11


def test_event_lines_from_many_threads_are_never_interleaved(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    threads = [threading.Thread(target=lambda i=i: [log.add("x", writer=i, n=n, pad="p" * 500) for n in range(50)])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sorted((r["writer"], r["n"]) for r in rows) == [(i, n) for i in range(8) for n in range(50)]
