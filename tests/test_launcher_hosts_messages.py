"""hosts.yaml messages for malformed files (tabs, tags, null entries, empty files) and the shipped examples."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launcher.hosts import HostsError, load_hosts, parse_hosts
from launcher.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
OK_HOST = "hosts:\n  - name: a\n    address: 127.0.0.1\n    gpus: 1\n"


@pytest.mark.parametrize("text, expected", [
    ("hosts:\n\t- name: a\n", r"x\.yaml:2: not valid YAML: .*indent with spaces"),
    ("hosts:\n  - name: a\n    address:\t127.0.0.1\n    gpus: 1\n", r"x\.yaml:3: .*indent with spaces"),
    ("hosts: []\n", r"x\.yaml:1: hosts: expected a non-empty list of hosts, got an empty list"),
    ("hosts:\n  - name: !!python/object:os.system a\n    address: h\n    gpus: 1\n",
     r"x\.yaml:2: hosts\[0\]\.name: .*tagged tag:yaml.org,2002:python/object:os.system \(YAML tags are not allowed\)"),
])
def test_messages_say_what_is_wrong_and_where(text, expected):
    """Bugs: a tab gave only PyYAML's 'cannot start any token'; `hosts: []` said 'got a list';
    a YAML tag was shown as an internal class name (_Unreadable)."""
    with pytest.raises(HostsError, match=expected) as e:
        parse_hosts(text, "x.yaml")
    assert "_Unreadable" not in str(e.value)


def test_null_host_entry_is_one_problem_not_four():
    """Bug: `- ` (a null entry) also reported name, address and gpus missing."""
    with pytest.raises(HostsError) as e:
        parse_hosts("hosts:\n  -\n" + OK_HOST.split("\n", 1)[1], "x.yaml")
    msg = str(e.value)
    assert msg.startswith("1 problem in x.yaml") and "hosts[0]: expected a mapping (name, address, gpus, ...), got null" in msg


@pytest.mark.parametrize("text, line, key", [
    ("hosts:\n  - name: a\n    adress: 127.0.0.1\n    gpus: 1\n", 3, r"hosts\[0\]\.adress: unknown key \(did you mean 'address'\?\)"),
    ("main_port: 1\nmain_port: 2\n" + OK_HOST, 2, r"main_port: duplicate key \(first set on line 1\)"),
    ("hosts:\n  - name: a\n    address: 127.0.0.1\n    gpus: \"2\"\n", 4, r"hosts\[0\]\.gpus: expected a list of GPU ids"),
    ("main_port: '29500'\n" + OK_HOST, 1, r"main_port: expected an integer, got '29500' \(str\)"),
])
def test_wrong_key_type_duplicate_name_key_and_line(text, line, key):
    with pytest.raises(HostsError, match=rf"x\.yaml:{line}: {key}"):
        parse_hosts(text, "x.yaml")


def test_empty_file_is_an_error(tmp_path):
    for text in ("", "# only a comment\n"):
        p = tmp_path / "h.yaml"
        p.write_text(text)
        with pytest.raises(HostsError, match="empty file"):
            load_hosts(p)


@pytest.mark.parametrize("name", ["hosts.yaml", "examples/hosts.loopback.yaml"])
def test_shipped_files_document_commands_that_exist(name):
    """Bug: hosts.yaml's usage comment named configs/mask_rcnn_r50.yaml (no such file) and the
    loopback example's commands had no --shards (the trainer then exits 'no shards')."""
    path = ROOT / name
    hosts = load_hosts(path)
    assert build_plan(hosts, ["--config", "configs/debug.yaml"])
    documented = 0
    for line in path.read_text().splitlines():
        m = re.search(r"launcher (?:plan|run)\s+\S+ -- (.*)$", line)
        if m:
            documented += 1
            args = shlex.split(m.group(1))
            config = args[args.index("--config") + 1]
            assert (ROOT / config).is_file(), (name, config)
            assert "--shards" in args, line
    assert documented >= 2
