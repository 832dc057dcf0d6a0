"""The per-host commands: exact torchrun argv, environment, ssh wrapping and literal quoting."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.cli import main as launcher_main
from launcher.hosts import parse_hosts
from launcher.plan import Target, build_plan, remote_command

ROOT = Path(__file__).resolve().parents[1]

TWO = """\
main_address: 10.0.0.1
main_port: 29600
rdzv_id: job7
backend: ddp
precision: fp16
hosts:
  - name: a
    address: localhost
    device: cuda
    gpus: [1, 3]
    batch_sizes: [2, 4]
    workdir: /w/a
    python: /py/a
  - name: b
    address: 10.0.0.2
    ssh_user: me
    ssh_port: 2200
    ssh_options: [-i, /k/id]
    gpus: 3
    env: {NCCL_SOCKET_IFNAME: eth0}
    python: /py/b
    workdir: /w/b
"""


def test_local_host_gets_exact_torchrun_argv_env_and_cwd():
    a, _ = build_plan(parse_hosts(TWO), ["--config", "c.yaml", "train.lr=0.1"])
    assert a.argv == [
        "/py/a", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
        "--rdzv-backend", "static", "--rdzv-id", "job7", "--node-rank", "0",
        "--master-addr", "10.0.0.1", "--master-port", "29600",
        "--max-restarts", "0", "--tee", "3", "--log-line-prefix-template", "[rank${rank}]: ",
        "-m", "fashionseg.train", "--config", "c.yaml", "train.lr=0.1",
        "train.backend=ddp", "train.precision=fp16"]
    assert a.env == {"CUDA_VISIBLE_DEVICES": "1,3", "FASHIONSEG_LOCAL_BATCH_SIZES": "2,4"}
    assert a.cwd == "/w/a" and a.remote_command is None and a.ranks == range(0, 2)


def test_remote_host_is_ssh_with_one_quoted_command():
    _, b = build_plan(parse_hosts(TWO), ["--config", "my cfg.yaml"])
    assert b.argv[:-2] == ["ssh", "-o", "BatchMode=yes", "-tt", "-p", "2200", "-l", "me", "-i", "/k/id",
                           "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    assert b.argv[-2] == "10.0.0.2" and b.argv[-1] == b.remote_command
    assert b.remote_command.startswith(
        "cd /w/b && exec env CUDA_VISIBLE_DEVICES=0,1,2 NCCL_SOCKET_IFNAME=eth0 /py/b -m torch.distributed.run "
        "--nnodes 2 --nproc-per-node 3 --rdzv-backend static --rdzv-id job7 --node-rank 1 ")
    assert "--config 'my cfg.yaml' train.backend=ddp" in b.remote_command
    assert "FASHIONSEG_LOCAL_BATCH_SIZES" not in b.remote_command  # no batch size: the config decides
    assert b.env == {} and b.cwd is None and b.ranks == range(2, 5)


def test_c10d_rendezvous_script_target_and_user_overrides_win():
    hosts = parse_hosts(TWO.replace("rdzv_id: job7", "rdzv_id: job7\nrendezvous: c10d"))
    a, b = build_plan(hosts, ["train.precision=fp32"], Target(module=None, script="t.py"))
    i = a.argv.index("--rdzv-backend")
    assert a.argv[i:i + 8] == ["--rdzv-backend", "c10d", "--rdzv-id", "job7",
                               "--rdzv-endpoint", "10.0.0.1:29600", "--rdzv-conf", "is_host=1"]
    assert "is_host=0" in b.remote_command and "--node-rank" not in a.argv
    assert a.argv[-3:] == ["t.py", "train.precision=fp32", "train.backend=ddp"]  # no second precision


def test_cpu_device_sets_accelerate_use_cpu(monkeypatch):
    hosts = parse_hosts(TWO.replace("device: cuda", "device: auto"))
    monkeypatch.setattr("launcher.plan.local_machine_has_gpu", lambda: False)
    a, b = build_plan(hosts, [])
    assert a.env["ACCELERATE_USE_CPU"] == "true"  # local, no GPU here: gloo CPU processes
    assert "ACCELERATE_USE_CPU" not in b.remote_command  # remote auto: the trainer decides
    monkeypatch.setattr("launcher.plan.local_machine_has_gpu", lambda: True)
    assert "ACCELERATE_USE_CPU" not in build_plan(hosts, [])[0].env
    forced = parse_hosts(TWO.replace("    python: /py/b", "    python: /py/b\n    device: cpu"))
    assert "ACCELERATE_USE_CPU=true" in build_plan(forced, [])[1].remote_command


def _fake_python(tmp_path: Path) -> Path:
    """An executable that records its argv, cwd and one env var: stands in for the remote python."""
    exe = tmp_path / "fakepy"
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'probe': os.environ.get('PROBE')},"
                   " open(os.environ['FAKEPY_OUT'], 'w'))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@settings(max_examples=40, deadline=None)
@given(value=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30))
def test_remote_command_is_literal_through_a_posix_shell(value, tmp_path_factory):
    """Whatever a value holds ($(...), quotes, ;, newlines), the remote shell passes it verbatim."""
    tmp = tmp_path_factory.mktemp("lit")
    exe, out = _fake_python(tmp), tmp / "out.json"
    workdir = tmp / "dir with $(x) 'q'"
    workdir.mkdir()
    cmd = remote_command([str(exe), value, "--x", value], {"PROBE": value, "FAKEPY_OUT": str(out)}, str(workdir))
    subprocess.run(["bash", "-c", cmd], check=True, env={"PATH": os.environ["PATH"]})
    got = json.loads(out.read_text())
    assert got == {"argv": [value, "--x", value], "cwd": str(workdir), "probe": value}


def test_plan_cli_prints_every_host(capsys):
    assert launcher_main(["plan", str(ROOT / "hosts.yaml"), "--", "--config", "c.yaml"]) == 0
    out = capsys.readouterr().out
    assert "world size 10" in out and out.count("\nssh -o BatchMode=yes -tt") == 2
    assert "--nproc-per-node 5" in out and "--nproc-per-node 3" in out and "--nproc-per-node 2" in out
    assert "FASHIONSEG_LOCAL_BATCH_SIZES=1,1" in out


def test_cli_reports_bad_hosts_file_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "h.yaml"
    bad.write_text("hosts:\n  - name: a\n    adress: x\n    gpus: 1\n")
    assert launcher_main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: hosts[0].adress: unknown key (did you mean 'address'?)" in err
