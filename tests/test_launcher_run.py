"""`launcher run` end to end on this CPU machine: a real two-node rendezvous over loopback.

Two hosts at 127.0.0.1 with 1 and 2 processes (gloo, one CPU process per `gpus` entry) train a
DDP model and must end with identical weights; a dying rank must bring everything down within
60 s with no process left; a remote host (a fake `ssh` that runs the command through `bash -c`
exactly as sshd does) must receive shell metacharacters literally.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from train_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "launcher_ddp_script.py"



def loopback_hosts(tmp_path: Path, small: bool = False) -> Path:
    """Two hosts at 127.0.0.1 with 1 + 2 processes (small: 1 + 1, for the stop tests)."""
    b_gpus = "[1]\n            batch_sizes: [1]" if small else "[1, 2]\n            batch_sizes: [1, 2]"
    path = tmp_path / "hosts.yaml"
    path.write_text(textwrap.dedent(f"""\
        main_port: {free_port()}
        rdzv_id: test
        backend: ddp
        precision: fp32
        defaults:
          env: {{GLOO_SOCKET_IFNAME: lo, OMP_NUM_THREADS: 1}}
        hosts:
          - name: node-a
            address: 127.0.0.1
            gpus: 1
            batch_size: 1
          - name: node-b
            address: 127.0.0.1
            gpus: {b_gpus}
        """))
    return path


def launcher(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_loopback_two_hosts_uneven_counts_train_to_identical_weights(tmp_path):
    out = tmp_path / "run"
    r = launcher("run", str(loopback_hosts(tmp_path)), "--script", str(SCRIPT), "--",
                 "--out", str(out), "--steps", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    infos = sorted((json.loads((out / f"rank{i}.json").read_text()) for i in range(3)), key=lambda d: d["rank"])
    assert [(d["world"], d["local_rank"], d["batch"], d["cuda_visible_devices"]) for d in infos] == [
        (3, 0, 1, "0"), (3, 0, 1, "1,2"), (3, 1, 2, "1,2")]  # static rendezvous: ranks in file order
    assert all(d["overrides"] == ["train.backend=ddp", "train.precision=fp32"] for d in infos)
    weights = [torch.load(out / f"rank{i}.pt") for i in range(3)]
    torch.manual_seed(0)
    init = torch.nn.Linear(4, 1).state_dict()
    for w in weights[1:]:
        assert all(torch.equal(w[k], weights[0][k]) for k in w)
    assert not torch.equal(weights[0]["weight"], init["weight"])  # it did train
    lines = r.stdout.splitlines()
    assert any(line.startswith("node-a | [rank0]: step 2 loss") for line in lines)
    assert any(line.startswith("node-b | [rank2]: step 2 loss") for line in lines)


@pytest.mark.slow
def test_loopback_real_trainer_uneven_batches_identical_weights(tmp_path, synth_shards):
    """The contract with fashionseg.train: torchrun env + FASHIONSEG_LOCAL_BATCH_SIZES per host."""
    out = tmp_path / "run"
    r = launcher("run", str(loopback_hosts(tmp_path)), "--", "--config", "configs/debug.yaml",
                 "--shards", str(synth_shards), "--out", str(out), "--max-steps", "2",
                 "eval.at_end=false", "log.log_with=[]", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "node-a | [rank0]: batch: global 4 = per-rank [1, 1, 2]" in r.stdout
    ranks = json.loads((out / "ranks.json").read_text())
    assert [(d["rank"], d["batch_size"], d["step"]) for d in ranks] == [(0, 1, 2), (1, 1, 2), (2, 2, 2)]
    assert len({d["params_sha256"] for d in ranks}) == 1  # every rank ends with the same weights
    assert (out / "model_final.pth").exists()


@pytest.mark.slow
def test_dying_rank_stops_every_host_without_orphans(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    # rank 1 (node-b) exits 3 after training; rank 0 (node-a) then sleeps: only the launcher ends it
    r = launcher("run", str(loopback_hosts(tmp_path, small=True)), "--script", str(SCRIPT), "--grace", "5", "--",
                 "--out", str(out), "--steps", "2", "--die-rank", "1", "--die-step", "2")
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr
    assert elapsed < 60
    assert "launcher: host node-b (node 1) exited with code 1; stopping the other hosts" in r.stderr
    assert "node-b: last" in r.stderr and "exitcode  : 3" in r.stderr  # the failing host's tail
    pids = [int(p) for f in out.glob("pid-rank*") for p in f.read_text().split()]
    assert len(pids) == 4  # 2 workers + their torchrun agents
    assert_all_gone(pids)
    events = [json.loads(line) for line in (out / "launcher_events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "failure", "give_up", "exit"]  # no --max-restarts: no restart
    assert events[1]["host"] == "node-b" and events[2]["reason"] == "0 restart(s) used of --max-restarts 0"


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_all_gone(pids: list[int], timeout: float = 10) -> None:
    """The launcher has returned, so these must be gone; allow the kernel a moment to reap them."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(pids) == [], f"left behind: {alive(pids)}"


FAKE_SSH = """\
#!/bin/bash
# Stands in for ssh + sshd: drop the client's options, then run the remaining words joined by
# spaces through `bash -c`, which is what sshd does with the command an ssh client sends.
while [ $# -gt 0 ]; do
  case "$1" in
    -p|-l|-o|-i|-F|-J) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$1" > "$FAKE_SSH_HOST_LOG"
shift
exec bash -c "$*"
"""


@pytest.mark.slow
def test_remote_host_receives_shell_metacharacters_literally(tmp_path):
    bin_dir, pwned = tmp_path / "bin", tmp_path / "pwned"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    evil = f"$(touch {pwned}); echo hi `touch {pwned}` 'q' \"dq\" & | > {pwned}"
    workdir = tmp_path / "work $(touch x) dir"
    workdir.mkdir()
    out = tmp_path / "out; touch pwned"
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(textwrap.dedent(f"""\
        main_address: 127.0.0.1
        main_port: {free_port()}
        hosts:
          - name: far
            address: far.example
            ssh_user: u
            ssh_port: 2222
            gpus: 1
            python: {json.dumps(sys.executable)}
            workdir: {json.dumps(str(workdir))}
            env:
              LAUNCHER_TEST_PROBE: {json.dumps(evil)}
              GLOO_SOCKET_IFNAME: lo
        """))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SSH_HOST_LOG=str(tmp_path / "host"))
    r = launcher("run", str(hosts), "--script", str(SCRIPT), "--", "--out", str(out), "--steps", "1", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "host").read_text().strip() == "far.example"  # it went through "ssh"
    info = json.loads((out / "rank0.json").read_text())
    assert info["probe"] == evil
    assert not pwned.exists() and not (workdir / "x").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_host(tmp_path):
    out = tmp_path / "run"
    # --hold: every rank trains one step, then sleeps until stopped (a run that ends by itself
    # would race the signal: it once finished first on a loaded machine and exited 0)
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(loopback_hosts(tmp_path, small=True)),
                                 "--script", str(SCRIPT), "--grace", "5", "--", "--out", str(out), "--steps", "1",
                                 "--hold"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60  # both ranks trained their step and now sleep until stopped
    while log.read_text().count("step 0 loss") < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert log.read_text().count("step 0 loss") == 2, log.read_text()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # say how the launcher held SIGINT (bit 1 of the masks), then clean up
        status = Path(f"/proc/{proc.pid}/status").read_text()
        proc.terminate()  # SIGTERM: the launcher stops its hosts, no orphans
        proc.wait(timeout=60)
        pytest.fail("the launcher did not stop on SIGINT within 60 s; its signal masks:\n"
                    + "\n".join(l for l in status.splitlines() if l.startswith("Sig")) + "\n" + log.read_text())
    assert proc.returncode == 130, log.read_text()
    assert "interrupted" in log.read_text()
    pids = [int(p) for f in out.glob("pid-rank*") for p in f.read_text().split()]
    assert len(pids) == 4
    assert_all_gone(pids)


# -- doctor ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_doctor_on_loopback_probes_both_hosts(tmp_path, synth_shards):
    from launcher.doctor import PACKAGES, evaluate, gather_all
    from launcher.hosts import load_hosts

    hosts = load_hosts(loopback_hosts(tmp_path))
    facts = gather_all(hosts, str(synth_shards), PACKAGES)
    assert facts[0]["port_free"] is True and facts[1]["port_open"] is True  # doctor listened meanwhile
    sha = facts[0]["manifest_sha256"]
    assert sha and facts[1]["manifest_sha256"] == sha and len(sha) == 64
    rows = {(r.host, r.check): r for r in evaluate(hosts, facts, min_free_gb=0.001, shards=str(synth_shards))}
    assert {k: r.status for k, r in rows.items() if r.status == "FAIL"} == {}
    for host in ("node-a", "node-b"):
        for check in ("reachable", "commit", "packages", "gpus", "disk", "shards", "port"):
            assert (host, check) in rows
    assert rows[("node-b", "port")].detail == f"reaches 127.0.0.1:{hosts.main_port}"


def test_doctor_verdicts_name_the_failure_and_the_fix():
    from launcher.doctor import evaluate
    from launcher.hosts import parse_hosts

    hosts = parse_hosts(textwrap.dedent("""\
        main_address: 10.0.0.1
        main_port: 29500
        hosts:
          - {name: main, address: localhost, gpus: 2}
          - {name: pascal, address: 10.0.0.2, ssh_user: me, workdir: /w, gpus: 2}
          - {name: gone, address: 10.0.0.3, gpus: 1}
        """))
    pk = {"torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130", "accelerate": "1.15.0", "fashionseg": "0.1.0",
          "webdataset": "1.0.2", "pycocotools": "2.0.11", "numpy": "2.4.6"}
    main = {"reachable": True, "commit": "a" * 40, "dirty": False, "packages": pk, "cuda": True,
            "gpus": [["H100", [9, 0]], ["H100", [9, 0]]], "arch_list": ["sm_75", "sm_80", "sm_90", "sm_120"],
            "disk_free": 100e9, "manifest_sha256": "1" * 64, "port_free": True, "cwd": "/w", "python": "3.11"}
    pascal = dict(main, commit="b" * 40, packages=dict(pk, torch="2.14.1+cu126", torchvision="0.28.0+cu126"),
                  gpus=[["GeForce GTX 1080 Ti", [6, 1]]] * 2, disk_free=5e9, manifest_sha256="2" * 64,
                  port_open=False, port_error="Connection refused")
    pascal.pop("port_free")
    gone = {"reachable": False, "error": "Connection timed out"}
    rows = {(r.host, r.check): r for r in evaluate(hosts, [main, pascal, gone], shards="shards")}
    assert all(r.status == "ok" for (h, _), r in rows.items() if h == "main")
    assert rows[("pascal", "commit")].fix == f"cd /w && git fetch && git checkout {'a' * 40}"
    pkgs = rows[("pascal", "packages")]  # torch's +cu126 vs +cu130 is expected; torchvision is not
    assert pkgs.status == "FAIL" and "torch " not in pkgs.detail and pkgs.fix.endswith("pip install torchvision==0.29.1")
    gpus = rows[("pascal", "gpus")]
    assert gpus.status == "FAIL" and "GeForce GTX 1080 Ti (sm_61)" in gpus.detail
    assert "--index-url https://download.pytorch.org/whl/cu126" in gpus.fix
    assert rows[("pascal", "disk")].status == "FAIL"
    assert rows[("pascal", "shards")].fix == "rsync -a --delete shards/ me@10.0.0.2:/w/shards/"
    assert rows[("pascal", "port")].status == "FAIL" and "firewall" in rows[("pascal", "port")].fix
    assert rows[("gone", "reachable")].status == "FAIL" and "ssh-copy-id 10.0.0.3" in rows[("gone", "reachable")].fix
    assert [k for k in rows if k[0] == "gone"] == [("gone", "reachable")]
