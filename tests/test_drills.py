"""Failure drills with real components: a real `sshd` on loopback, real torchrun, the real trainer.

Two hosts, one rank each (CPU, gloo, configs/debug.yaml, deterministic): `node-a` runs locally,
`node-b` over real ssh to an sshd this module starts on a free port of 127.0.0.1 (keys and config
in a temp dir). Each drill breaks the run from outside while it trains, under
`launcher run --max-restarts`, and checks: the failure is detected (the time is printed, see
docs/fault_tolerance.md), no process of the run is left, every checkpoint folder is complete, the
run finishes at the right step, and its final weights are torch.equal to an uninterrupted run.

Skipped with the reason when `sshd` is not installed (.ci/run installs openssh-server), and the
network drill when not root (it needs a network namespace).
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
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
SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None)
needs_sshd = pytest.mark.skipif(SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                                reason="sshd/ssh/ssh-keygen not installed (apt-get install openssh-server; "
                                       ".ci/run does it)")
MAX_STEPS, CKPT_EVERY = 6, 2
TRAIN_ARGS = ["--config", "configs/debug.yaml", "--max-steps", str(MAX_STEPS), f"train.checkpoint_every={CKPT_EVERY}",
              "train.keep_checkpoints=10", "log.every=1", "eval.at_end=false", "log.log_with=[]", "log.rich=false"]


def trainer_has(key: str) -> bool:
    """The trainer's config knows `train.<key>` (features the trainer gains in parallel)."""
    import dataclasses

    from fashionseg.train.config import TrainConfig
    return key in {f.name for f in dataclasses.fields(TrainConfig)}


# -- sshd on loopback ---------------------------------------------------------------------------
class Sshd:
    """A real sshd on 127.0.0.1:port (or inside a network namespace), keys generated for this test."""

    def __init__(self, root: Path, listen: str = "127.0.0.1", netns: str | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.listen, self.port = root, listen, free_port()
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        os.chmod(root / "authorized_keys", 0o600)
        # ClientAlive*: sshd hangs up a session whose client vanished (the network drill) within ~3 s
        (root / "sshd_config").write_text(textwrap.dedent(f"""\
            Port {self.port}
            ListenAddress {listen}
            HostKey {root / 'host_key'}
            AuthorizedKeysFile {root / 'authorized_keys'}
            PidFile {root / 'sshd.pid'}
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            PermitRootLogin prohibit-password
            StrictModes no
            UsePAM no
            ClientAliveInterval 1
            ClientAliveCountMax 3
            """))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir sshd insists on
        argv = [SSHD, "-D", "-e", "-f", str(root / "sshd_config")]
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.log = open(root / "sshd.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.options = ["-i", str(root / "user_key"), "-o", f"HostName={listen}", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "sshd.log").read_text()
            r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-p", str(self.port),
                                *self.options, "loopback", "true"], capture_output=True, timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("sshd did not accept a login: " + (self.root / "sshd.log").read_text())

    def stop(self) -> None:
        with _gone():
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.log.close()


class _gone:
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, (ProcessLookupError, psutil.Error))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None:
        pytest.skip("sshd not installed")
    s = Sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


def hosts_yaml(path: Path, sshd: Sshd | None, *, main_address: str = "127.0.0.2", ifname=("lo", "lo"),
               extra_ssh: tuple[str, ...] = ()) -> Path:
    """node-a: local, 1 rank; node-b: over ssh to `sshd` (or local when None), 1 rank; batch 1 each.

    main_address 127.0.0.2: loopback too, but not a name hosts.yaml treats as "this machine only"
    (which it refuses as main_address once a host is remote)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": 1}
    b = {"name": "node-b", "gpus": [1], "batch_size": 1, "device": "cpu", "env": {**env, "GLOO_SOCKET_IFNAME": ifname[1]}}
    if sshd is None:
        b["address"] = "127.0.0.1"
    else:
        b.update(address="sshd-loopback", ssh_port=sshd.port, ssh_user=getpass.getuser(),
                 ssh_options=[*extra_ssh, *sshd.options], python=sys.executable, workdir=str(ROOT))
    doc = {"main_address": main_address, "main_port": free_port(), "rdzv_id": "drill", "backend": "ddp",
           "precision": "fp32",
           "hosts": [{"name": "node-a", "address": "127.0.0.1", "gpus": 1, "batch_size": 1, "device": "cpu",
                      "env": {**env, "GLOO_SOCKET_IFNAME": ifname[0]}}, b]}
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_launchers():
    """A drill that fails half-way must not leave its run behind: SIGTERM stops every host."""
    yield
    while _LAUNCHED:
        proc = _LAUNCHED.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_launcher(hosts: Path, out: Path, shards: Path, *launcher_args: str, train_args=()) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.launcher.log", "w")
    argv = [sys.executable, "-m", "launcher.cli", "run", str(hosts), "--grace", "5", *launcher_args,
            "--", *TRAIN_ARGS, "--shards", str(shards), "--out", str(out), *train_args]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    _LAUNCHED.append(proc)
    return proc


def finish(proc: subprocess.Popen, out: Path, timeout: float = 400) -> str:
    proc.wait(timeout=timeout)
    return (out.parent / f"{out.name}.launcher.log").read_text()


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, out: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher ended (rc {proc.returncode}) while waiting for {what}:\n" +
                                 (out.parent / f"{out.name}.launcher.log").read_text()[-4000:])
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_procs(out: Path) -> list[psutil.Process]:
    """Every live process started for this run (its run dir is on the command line)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(out) in " ".join(p.info["cmdline"] or []) \
                    and "launcher.cli" not in " ".join(p.info["cmdline"]):
                found.append(p)
        except psutil.Error:
            continue
    return found


def rank_proc(out: Path, rank: int) -> psutil.Process | None:
    for p in run_procs(out):
        try:
            if "torch.distributed.run" not in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    return None


def torchrun_proc(out: Path, host_name: str, node_rank: int) -> psutil.Process | None:
    for p in run_procs(out):
        try:
            cmd = p.cmdline()
            if "torch.distributed.run" in cmd and cmd[cmd.index("--node-rank") + 1] == str(node_rank):
                return p
        except (psutil.Error, ValueError, IndexError):
            continue
    return None


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))


def events(out: Path) -> list[dict]:
    path = out / "launcher_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def new_checkpoint(out: Path, after: int):
    """A complete checkpoint newer than step `after`, written by the current attempt."""
    return lambda: next((s for s in checkpoint_steps(out) if s > after), None)


def assert_clean_finish(out: Path, log: str, rc: int, reference: Path) -> None:
    assert rc == 0, log[-6000:]
    wait_for(lambda: not run_procs(out), 60, "every process of the run to end (remote ones end on SIGHUP)")
    assert not list((out / "checkpoints").glob(".*")), "a half-written checkpoint was left"
    from fashionseg.train.checkpoint import list_checkpoints, read
    for c in list_checkpoints(out):  # every checkpoint folder is complete and loads
        assert read(c)["step"] == int(c.name[5:])
    ev = events(out)
    assert ev[-1] == {**ev[-1], "event": "exit", "code": 0}
    assert [e["step"] for e in ev if e["event"] == "done"] == [MAX_STEPS]
    from fashionseg.model.weights_file import read_weights
    from fashionseg.names import FINAL_WEIGHTS
    got, want = read_weights(out / FINAL_WEIGHTS).model, read_weights(reference / FINAL_WEIGHTS).model
    assert got.keys() == want.keys()
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert unequal == [], f"{len(unequal)} tensors differ from the uninterrupted run, e.g. {unequal[:3]}"


def detect_times(out: Path, kill_times: list[float]) -> list[float]:
    failures = [e["detected"] for e in events(out) if e["event"] == "failure"]
    assert len(failures) == len(kill_times), events(out)
    return [round(d - k, 2) for d, k in zip(failures, kill_times)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_shards):
    """The uninterrupted run: same two-rank layout, both hosts local."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    proc = start_launcher(hosts_yaml(tmp / "hosts.yaml", None), out, synth_shards)
    log = finish(proc, out)
    assert proc.returncode == 0, log[-6000:]
    return out


# -- drills -------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_sshd
def test_kill_rank_then_kill_torchrun_over_real_ssh_restarts_to_identical_weights(tmp_path, sshd, synth_shards,
                                                                                  reference):
    """kill -9 the remote rank mid-step, then kill -9 the local host's torchrun: two restarts."""
    out = tmp_path / "run"
    proc = start_launcher(hosts_yaml(tmp_path / "hosts.yaml", sshd), out, synth_shards,
                          "--max-restarts", "2", "--restart-delay", "1")
    kills = []
    first = wait_for(new_checkpoint(out, 0), 300, "the first checkpoint", proc, out)
    victim = wait_for(lambda: rank_proc(out, 1), 30, "rank 1 (remote)", proc, out)
    victim.kill()
    kills.append(time.time())
    wait_for(lambda: any(e["event"] == "resumed" for e in events(out)), 300, "the first restart to train", proc, out)
    agent = wait_for(lambda: torchrun_proc(out, "node-a", 0), 30, "node-a's torchrun", proc, out)
    wait_for(new_checkpoint(out, first), 300, "a checkpoint after the restart", proc, out)
    agent.kill()
    kills.append(time.time())
    log = finish(proc, out)
    assert_clean_finish(out, log, proc.returncode, reference)
    ev = events(out)
    failures = [e for e in ev if e["event"] == "failure"]
    assert [(e["host"], e["exit_code"]) for e in failures][0][0] == "node-b"
    assert failures[1]["host"] == "node-a" and failures[1]["exit_code"] == -9
    assert all(0 <= e["lost_steps"] <= CKPT_EVERY for e in failures)  # at most the steps since the checkpoint
    assert [e["resume_step"] for e in ev if e["event"] == "start"][1:] == [f["checkpoint_step"] for f in failures]
    assert "launcher run: attempts" in log
    times = detect_times(out, kills)
    recovery = [e["recovery_s"] for e in ev if e["event"] == "resumed"]
    print(f"\nDRILL kill-rank / kill-torchrun: detected after {times} s, training again after {recovery} s")
    assert all(t < 30 for t in times)


@pytest.mark.slow
@needs_sshd
@pytest.mark.skipif(not (trainer_has("stall_timeout_s") and trainer_has("collective_timeout_s")),
                    reason="needs the trainer's train.stall_timeout_s / train.collective_timeout_s (issue 12 item 4)")
def test_stopped_rank_is_detected_by_the_stall_watchdog_and_restarted(tmp_path, sshd, synth_shards, reference):
    """SIGSTOP the remote rank: the other rank blocks in a collective until its stall watchdog fires
    (stall 15 s, well under the collective timeout of 60 s, so the watchdog is what detects it)."""
    out = tmp_path / "run"
    proc = start_launcher(hosts_yaml(tmp_path / "hosts.yaml", sshd), out, synth_shards,
                          "--max-restarts", "1", "--restart-delay", "1",
                          train_args=["train.stall_timeout_s=15", "train.collective_timeout_s=60"])
    wait_for(new_checkpoint(out, 0), 300, "the first checkpoint", proc, out)
    victim = wait_for(lambda: rank_proc(out, 1), 30, "rank 1 (remote)", proc, out)
    victim.suspend()
    stopped = time.time()
    log = finish(proc, out)
    assert_clean_finish(out, log, proc.returncode, reference)
    dumps = list(out.glob("stall_rank*.txt"))  # the watchdog left every thread's stack
    assert dumps and "no training step completed" in dumps[0].read_text()
    times = detect_times(out, [stopped])
    print(f"\nDRILL SIGSTOP: detected after {times} s")
    assert times[0] < 120


NETNS, VETH_HOST, VETH_NS = "fsdrill", "fsdrill0", "fsdrill1"
ADDR_HOST, ADDR_NS = "10.231.7.1", "10.231.7.2"


@pytest.fixture
def netns_sshd(tmp_path):
    """sshd inside a network namespace reached over a veth pair (root only)."""
    if os.geteuid() != 0:
        pytest.skip("the network drill needs root (network namespace + veth pair); run it in CI as root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) not installed")
    sh = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace / veth pair here: {e.stderr.decode().strip()}")
    sh("ip", "link", "set", VETH_NS, "netns", NETNS)
    sh("ip", "addr", "add", f"{ADDR_HOST}/24", "dev", VETH_HOST)
    sh("ip", "link", "set", VETH_HOST, "up")
    sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{ADDR_NS}/24", "dev", VETH_NS)
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up")
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
    s = Sshd(tmp_path / "sshd", listen=ADDR_NS, netns=NETNS)
    yield s
    s.stop()
    subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.mark.slow
@needs_sshd
def test_broken_network_of_one_host_is_detected_and_the_run_recovers(tmp_path, netns_sshd, synth_shards, reference):
    """Set the veth link of the namespaced host down mid-run; bring it back before the restart."""
    out = tmp_path / "run"
    hosts = hosts_yaml(tmp_path / "hosts.yaml", netns_sshd, main_address=ADDR_HOST, ifname=(VETH_HOST, VETH_NS),
                       extra_ssh=("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"))
    proc = start_launcher(hosts, out, synth_shards, "--max-restarts", "1", "--restart-delay", "3")
    wait_for(new_checkpoint(out, 0), 300, "the first checkpoint", proc, out)
    subprocess.run(["ip", "link", "set", VETH_HOST, "down"], check=True)
    down = time.time()
    try:
        wait_for(lambda: any(e["event"] == "failure" for e in events(out)), 120, "the failure to be noticed", proc, out)
    finally:
        subprocess.run(["ip", "link", "set", VETH_HOST, "up"], check=True)
    log = finish(proc, out)
    assert_clean_finish(out, log, proc.returncode, reference)
    failure = next(e for e in events(out) if e["event"] == "failure")
    assert failure["host"] in ("node-a", "node-b")
    times = detect_times(out, [down])
    print(f"\nDRILL network down: detected after {times} s (failure on {failure['host']}, exit {failure['exit_code']})")
    assert times[0] < 60


@pytest.mark.slow
@pytest.mark.skipif(not trainer_has("record_samples"),
                    reason="needs the trainer's elastic --resume and train.record_samples (issue 12 items 1-2)")
def test_dropped_host_run_continues_elastically_and_trains_each_sample_once(tmp_path, synth_shards):
    """kill -9 node-b's rank with --drop-failed-hosts 1: the run resumes on node-a alone (world 2 -> 1)."""
    out = tmp_path / "run"
    proc = start_launcher(hosts_yaml(tmp_path / "hosts.yaml", None), out, synth_shards,
                          "--max-restarts", "1", "--restart-delay", "0", "--drop-failed-hosts", "1",
                          train_args=["train.record_samples=true"])
    wait_for(new_checkpoint(out, 0), 300, "the first checkpoint", proc, out)
    wait_for(lambda: rank_proc(out, 1), 30, "rank 1", proc, out).kill()
    log = finish(proc, out)
    assert proc.returncode == 0, log[-6000:]
    wait_for(lambda: not run_procs(out), 60, "every process of the run to end")
    ev = events(out)
    starts = [e for e in ev if e["event"] == "start"]
    assert [(s["hosts"], s["world_size"]) for s in starts] == [(["node-a", "node-b"], 2), (["node-a"], 1)]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    per_rank_steps: dict[tuple[int, int], int] = {}
    seen: dict[int, list[str]] = {}
    for r in rows:
        key = (r["rank"], r["step"])
        assert key not in per_rank_steps, f"step {r['step']} of rank {r['rank']} recorded twice (rows past the checkpoint kept)"
        per_rank_steps[key] = 1
        seen.setdefault(r["epoch"], []).extend(r["keys"])
    for epoch, keys in seen.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample was trained twice across the resume"
    assert {e["step"] for e in ev if e["event"] == "done"} == {max(s for _, s in per_rank_steps)}
