"""hosts.yaml validation: every problem names file, line, key and (for typos) the closest key."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from launcher.hosts import HostsError, load_hosts, parse_hosts

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
main_port: 29600
backend: deepspeed
precision: bf16
defaults:
  workdir: /srv/fs
  batch_size: 2
  env: {NCCL_SOCKET_IFNAME: eth0}
hosts:
  - name: a
    address: 10.0.0.1
    gpus: [1, 3]
    env: {NCCL_SOCKET_IFNAME: eth1, EXTRA: 7}
  - name: b
    address: 10.0.0.2
    ssh_user: me
    ssh_port: 2200
    gpus: 3
    batch_sizes: [1, 2, 3]
    python: /opt/py/bin/python
"""


def errors(text: str) -> str:
    with pytest.raises(HostsError) as e:
        parse_hosts(textwrap.dedent(text), "h.yaml")
    return str(e.value)


def test_good_file_resolves_defaults_counts_and_batch_sizes():
    h = parse_hosts(GOOD, "h.yaml")
    a, b = h.hosts
    assert (h.main_address, h.main_port, h.backend, h.precision, h.rendezvous) == (
        "10.0.0.1", 29600, "deepspeed", "bf16", "static")
    assert a.gpus == (1, 3) and a.batch_sizes == (2, 2) and a.workdir == "/srv/fs"
    assert a.env == {"NCCL_SOCKET_IFNAME": "eth1", "EXTRA": "7"}  # host env merged over defaults
    assert b.gpus == (0, 1, 2) and b.batch_sizes == (1, 2, 3) and b.ssh_port == 2200
    assert b.env == {"NCCL_SOCKET_IFNAME": "eth0"} and b.python == "/opt/py/bin/python"
    assert h.world_size == 5 and h.rank_ranges() == [range(0, 2), range(2, 5)]


def test_unknown_key_names_line_and_closest_key():
    msg = errors("""\
        hosts:
          - name: a
            address: 10.0.0.1
            gpus: 2
            ssh_prot: 22
        """)
    assert "h.yaml:5: hosts[0].ssh_prot: unknown key (did you mean 'ssh_port'?)" in msg
    assert "did you mean 'main_port'" in errors("main_prot: 1\nhosts: [{name: a, address: x, gpus: 1}]\n")


def test_duplicate_keys_at_any_level_are_errors_with_both_lines():
    msg = errors("""\
        main_port: 1
        hosts:
          - name: a
            address: 10.0.0.1
            gpus: 2
            env:
              X: 1
              X: 2
            gpus: 3
        main_port: 2
        """)
    assert "h.yaml:8: hosts[0].env.X: duplicate key (first set on line 7)" in msg
    assert "h.yaml:9: hosts[0].gpus: duplicate key (first set on line 5)" in msg
    assert "h.yaml:10: main_port: duplicate key (first set on line 1)" in msg


@pytest.mark.parametrize("snippet, expected", [
    ("gpus: two", "h.yaml:4: hosts[0].gpus: expected a list of GPU ids ([0, 1]) or a count (2), got 'two' (str)"),
    ("gpus: [0, 0]", "h.yaml:4: hosts[0].gpus: GPU ids repeat: [0, 0]"),
    ("gpus: 0", "h.yaml:4: hosts[0].gpus: a GPU count must be >= 1"),
    ("gpus: [0, x]", "h.yaml:4: hosts[0].gpus[1]: expected an integer, got 'x' (str)"),
    ("gpus: 2\n    batch_sizes: [1]", "h.yaml:5: hosts[0].batch_sizes: 1 batch sizes for 2 GPUs"),
    ("gpus: 2\n    batch_size: 0", "h.yaml:5: hosts[0].batch_size: 0 is out of range"),
    ("gpus: 2\n    ssh_port: '22'", "h.yaml:5: hosts[0].ssh_port: expected an integer, got '22' (str)"),
    ("gpus: 2\n    env: {A: true}", "hosts[0].env.A: expected a string or number, got True (bool)"),
    ("gpus: 2\n    env: {CUDA_VISIBLE_DEVICES: '1'}", "hosts[0].env.CUDA_VISIBLE_DEVICES: set by the launcher"),
    ("gpus: 2\n    env: {1A: x}", "hosts[0].env.1A: not a valid environment variable name"),
    ("gpus: 2\n    python: /p\n    venv: /v", "h.yaml:6: hosts[0].venv: set either 'python' or 'venv'"),
])
def test_wrong_types_name_key_and_line(snippet, expected):
    msg = errors(f"hosts:\n  - name: a\n    address: 10.0.0.1\n    {snippet}\n")
    assert expected in msg, msg


def test_globals_missing_keys_and_duplicate_hosts():
    msg = errors("""\
        backend: horovod
        hosts:
          - name: a
            address: 10.0.0.1
            gpus: 1
          - name: a
            gpus: 1
        """)
    assert "h.yaml:1: backend: expected one of ddp|deepspeed, got 'horovod' (str)" in msg
    assert "h.yaml:6: hosts[1]: missing required key 'address'" in msg
    assert "problems" in msg  # all reported at once
    dup = errors("hosts:\n  - {name: a, address: x, gpus: 1}\n  - {name: a, address: y, gpus: 1}\n")
    assert "h.yaml:3: hosts: duplicate host name 'a' (first on line 2)" in dup


def test_one_machine_listed_twice_needs_disjoint_gpus():
    msg = errors("hosts:\n  - {name: a, address: 127.0.0.1, gpus: 2}\n  - {name: b, address: localhost, gpus: [1, 2]}\n")
    assert "h.yaml:3: hosts: 'b' and 'a' are the same machine (localhost) and both use GPU 1" in msg
    parse_hosts("hosts:\n  - {name: a, address: 127.0.0.1, gpus: [0]}\n  - {name: b, address: 127.0.0.1, gpus: [1, 2]}\n")


def test_local_main_with_remote_hosts_needs_main_address():
    msg = errors("hosts:\n  - {name: a, address: localhost, gpus: 1}\n  - {name: b, address: 10.0.0.2, gpus: 1}\n")
    assert "main_address: the first host 'a' is localhost but 'b' is remote" in msg
    ok = parse_hosts("main_address: 10.0.0.1\nhosts:\n  - {name: a, address: localhost, gpus: 1}\n"
                     "  - {name: b, address: 10.0.0.2, gpus: 1}\n")
    assert ok.main_address == "10.0.0.1" and ok.hosts[0].is_local and not ok.hosts[1].is_local


def test_yaml_syntax_error_and_merge_keys_report_lines():
    assert re.search(r"h\.yaml:4: not valid YAML: .* \(while parsing a flow sequence started on line 3\)",
                     errors("hosts:\n  - name: a\n    gpus: [1\n"))
    msg = errors("""\
        base: &b {gpus: 1}
        hosts:
          - <<: *b
            name: a
            address: x
        """)
    assert "h.yaml:1: base: unknown key" in msg
    assert "h.yaml:3: hosts[0]: merge keys (<<) are not supported" in msg


def test_shipped_examples_validate():
    rigs = load_hosts(ROOT / "hosts.yaml")
    assert [h.nproc for h in rigs.hosts] == [5, 3, 2] and rigs.world_size == 10
    assert rigs.hosts[2].batch_sizes == (1, 1) and rigs.hosts[0].is_local
    loop = load_hosts(ROOT / "examples" / "hosts.loopback.yaml")
    assert [h.nproc for h in loop.hosts] == [1, 2] and all(h.address == "127.0.0.1" for h in loop.hosts)
    # the commented single-machine block of hosts.yaml, uncommented, is a valid file of its own
    text = (ROOT / "hosts.yaml").read_text()
    block = text.split("# BEGIN single-machine example\n")[1].split("# END single-machine example")[0]
    single = parse_hosts("\n".join(line[2:] for line in block.splitlines()), "single")
    assert [(h.name, h.gpus, h.batch_sizes) for h in single.hosts] == [("local", (0, 1), (4, 4))]
