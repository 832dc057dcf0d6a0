"""`launcher calibrate hosts.yaml`: per-rank batch sizes that give every rank the same step time.

On mixed cards (1080 Ti beside Titan X Maxwell) equal batch sizes make every step wait for the
slowest card. calibrate runs launcher/probe.py on every host (one probe per distinct GPU model),
fits each card's measured step time and memory to a line in the batch size, and chooses integer
batch sizes that minimise the slowest rank's step time, within each card's memory, with the
global batch equal to the requested one (fewer only when the cards cannot hold it). It prints a
table and writes the choice into a copy of hosts.yaml (`batch_sizes:` per host; every comment
and everything else in the file kept as it was).
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

MEMORY_HEADROOM = 0.9   # use at most this fraction of a card's memory (fragmentation, CUDA context)


@dataclass(frozen=True)
class Curve:
    """One card model's measurements: batch -> seconds per step, batch -> peak bytes."""

    name: str
    step_time: dict[int, float]
    peak_memory: dict[int, float] | None = None   # None: no limit known (CPU)
    total_memory: float | None = None
    oom_at: int | None = None                      # the smallest batch that ran out of memory

    def time(self, b: int) -> float:
        a, c = _line(self.step_time)
        return a + c * b

    def max_batch(self, cap: int = 1 << 16) -> int:
        """The largest batch that fits: below a measured OOM and the fitted memory line's limit."""
        limit = cap if self.oom_at is None else self.oom_at - 1
        if self.peak_memory and self.total_memory:
            m0, k = _line(self.peak_memory)
            if k > 0:
                limit = min(limit, int((self.total_memory * MEMORY_HEADROOM - m0) // k))
        return max(limit, 1)


def _line(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares intercept and slope (a flat line through one point)."""
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, max(slope, 0.0)


def choose_batch_sizes(curves: list[Curve], global_batch: int) -> list[int]:
    """Per-rank batch sizes (one per curve, i.e. per rank) summing to `global_batch` where memory allows,
    minimising the largest predicted step time.

    Greedy: every rank starts at 1; each further image goes to the rank whose step time after
    taking it is smallest. With step times increasing in the batch this minimises the maximum.
    """
    sizes = [1] * len(curves)
    limits = [c.max_batch() for c in curves]
    while sum(sizes) < global_batch:
        open_ = [i for i in range(len(curves)) if sizes[i] < limits[i]]
        if not open_:
            break
        i = min(open_, key=lambda r: (curves[r].time(sizes[r] + 1), r))
        sizes[i] += 1
    return sizes


# -- probing the hosts ------------------------------------------------------------------------
def probe_host(host, args: dict, timeout: float = 1800) -> dict:
    """Run launcher/probe.py on `host` (its python, workdir, env, GPUs); {"error": ...} on failure."""
    import os

    from launcher.doctor import host_command, unreachable
    from launcher.probe import MARKER

    error = unreachable(host)
    if error is not None:
        return {"error": f"unreachable: {error}"}
    argv, env, cwd = host_command(host, ["-m", "launcher.probe", json.dumps(args)])
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"cannot run the probe: {e}"}
    for line in p.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"error": f"probe failed: {tail}"}


def curves_from_probe(result: dict) -> dict[str, Curve]:
    out = {}
    for d in result["devices"]:
        ok = [p for p in d["points"] if not p["oom"]]
        if not ok:
            continue
        mem = {p["batch"]: p["peak_memory"] for p in ok if p.get("peak_memory")}
        oom = next((p["batch"] for p in d["points"] if p["oom"]), None)
        out[d["name"]] = Curve(d["name"], {p["batch"]: p["step_time"] for p in ok}, mem or None,
                               d.get("total_memory"), oom)
    return out


def rank_curves(hosts, probes: list[dict]) -> list[Curve]:
    """One curve per global rank: its host's probe for the GPU model at that local index."""
    curves = []
    for host, result in zip(hosts.hosts, probes):
        by_name = curves_from_probe(result)
        local = {i: d["name"] for d in result["devices"] for i in d["local_ids"]}
        for i in range(host.nproc):
            name = local.get(i, result["devices"][0]["name"])
            curves.append(by_name[name])
    return curves


# -- writing the copy ---------------------------------------------------------------------------
def with_batch_sizes(text: str, sizes: dict[int, list[int]]) -> str:
    """hosts.yaml text with `batch_sizes: [...]` set for host i (replacing batch_size / batch_sizes);
    only those spans change, so comments and layout stay."""
    import yaml
    from yaml.nodes import MappingNode

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    hosts_node = next(v for k, v in root.value if k.value == "hosts")
    edits = []   # (start, end, replacement)
    for i, node in enumerate(hosts_node.value):
        if i not in sizes or not isinstance(node, MappingNode):
            continue
        value = "[" + ", ".join(map(str, sizes[i])) + "]"
        keys = {k.value: (k, v) for k, v in node.value}
        if "batch_sizes" in keys:
            _, v = keys["batch_sizes"]
            edits.append((v.start_mark.index, v.end_mark.index, value))
        elif "batch_size" in keys:
            k, v = keys["batch_size"]
            edits.append((k.start_mark.index, v.end_mark.index, f"batch_sizes: {value}"))
        else:
            k, v = keys["gpus"]
            if node.flow_style:
                edits.append((v.end_mark.index, v.end_mark.index, f", batch_sizes: {value}"))
            else:
                eol = text.find("\n", v.end_mark.index)   # after the line's comment, if any
                eol = len(text) if eol < 0 else eol
                edits.append((eol, eol, "\n" + " " * k.start_mark.column + f"batch_sizes: {value}"))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def render(hosts, curves: list[Curve], before: list[int], after: list[int], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="launcher calibrate: per-rank batch sizes")
    for col in ("rank", "host", "card", "batch now", "step s now", "batch new", "step s new", "max batch"):
        t.add_column(col)
    rank = 0
    for h in hosts.hosts:
        for _ in range(h.nproc):
            c = curves[rank]
            t.add_row(str(rank), h.name, c.name, str(before[rank]), f"{c.time(before[rank]):.3f}",
                      str(after[rank]), f"{c.time(after[rank]):.3f}",
                      str(c.max_batch()) if c.peak_memory or c.oom_at else "-")
            rank += 1
    Console(file=file, width=160).print(t)
    slow = lambda sizes: max(c.time(b) for c, b in zip(curves, sizes))  # noqa: E731
    Console(file=file, width=160).print(
        f"global batch {sum(before)} -> {sum(after)}; slowest rank's step {slow(before):.3f} s -> {slow(after):.3f} s; "
        f"images/s {sum(before) / slow(before):.1f} -> {sum(after) / slow(after):.1f}")


def add_arguments(parser) -> None:
    parser.add_argument("hosts", help="hosts.yaml")
    parser.add_argument("--out", default=None, help="where to write the calibrated copy (default HOSTS.calibrated.yaml)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="images per step over all ranks (default: today's total from hosts.yaml)")
    parser.add_argument("--batch-sizes", default="1,2,4", help="batch sizes to probe (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (default 3, after 1 warm-up)")


def run(args) -> int:
    import sys

    from launcher.hosts import load_hosts, parse_hosts

    hosts = load_hosts(args.hosts)
    config = next((args.train_args[i + 1] for i, a in enumerate(args.train_args[:-1]) if a == "--config"), None)
    if config is None:
        print("launcher calibrate: pass the run's config after '--': -- --config configs/fashionpedia_r50.yaml",
              file=sys.stderr)
        return 2
    overrides = [a for a in args.train_args if "=" in a and not a.startswith("-")]
    probe_args = {"config": config, "overrides": overrides, "steps": args.steps, "warmup": 1,
                  "batch_sizes": [int(b) for b in args.batch_sizes.split(",")]}
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        probes = list(pool.map(lambda h: probe_host(h, probe_args), hosts.hosts))
    failed = [(h.name, p["error"]) for h, p in zip(hosts.hosts, probes) if "error" in p]
    for name, error in failed:
        print(f"launcher calibrate: {name}: {error}", file=sys.stderr)
    if failed:
        return 1
    curves = rank_curves(hosts, probes)
    before = [b for h, p in zip(hosts.hosts, probes) for b in (h.batch_sizes or (p["train_batch_size"],) * h.nproc)]
    after = choose_batch_sizes(curves, args.global_batch or sum(before))
    render(hosts, curves, before, after)
    sizes, rank = {}, 0
    for i, h in enumerate(hosts.hosts):
        sizes[i], rank = after[rank:rank + h.nproc], rank + h.nproc
    out = Path(args.out or str(Path(args.hosts).with_suffix("")) + ".calibrated.yaml")
    text = with_batch_sizes(Path(args.hosts).read_text(), sizes)
    parse_hosts(text, str(out))  # the copy must still be a valid hosts.yaml
    from fashionseg.io import atomic_write_text
    atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0
