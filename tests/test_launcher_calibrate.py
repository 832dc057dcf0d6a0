"""`launcher calibrate`: the batch-size choice (pure, measured-shape curves), the hosts.yaml copy,
and the probe itself on the CPU through the real CLI."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.calibrate import Curve, choose_batch_sizes, with_batch_sizes
from launcher.hosts import load_hosts, parse_hosts

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def card(name: str, base: float, per_image: float, total_gb: float, oom_at: int | None = None) -> Curve:
    """Step time / peak memory linear in the batch, as Mask R-CNN R50-FPN at 1024 px measures on
    these cards: ~0.2 s and ~1.9 GB more per image on a 1080 Ti, a Titan X Maxwell ~0.6x as fast."""
    return Curve(name, {b: base + per_image * b for b in (1, 2, 4)},
                 {b: 1.6 * GB + 1.9 * GB * b for b in (1, 2, 4)}, total_gb * GB, oom_at)


TI = card("GeForce GTX 1080 Ti", 0.12, 0.20, 11.7)
MAXWELL = card("GeForce GTX TITAN X", 0.18, 0.34, 12.8)
RIGS = [TI] * 8 + [MAXWELL] * 2   # hosts.yaml: 5 + 3 1080 Ti, 2 Titan X


def slowest(curves, sizes):
    return max(c.time(b) for c, b in zip(curves, sizes))


def test_mixed_cards_get_batch_sizes_that_equalise_step_time():
    sizes = choose_batch_sizes(RIGS, 20)
    assert sum(sizes) == 20                       # the global batch of 2 per GPU is kept
    assert sizes[8:] == [1, 1]                    # the slow cards take fewer images
    assert all(b >= 2 for b in sizes[:8])
    before = slowest(RIGS, [2] * 10)              # 0.86 s: every step waits for the Titans
    assert slowest(RIGS, sizes) < 0.85 * before   # 0.72 s: 19% more images/s at the same global batch
    spread = [c.time(b) for c, b in zip(RIGS, sizes)]
    assert max(spread) - min(spread) < max(c.time(2) - c.time(1) for c in RIGS)  # within one image's time


def test_memory_limits_cap_each_card_and_the_global_batch():
    assert TI.max_batch() == 4 and MAXWELL.max_batch() == 5       # (0.9 * total - 1.6 GB) / 1.9 GB
    sizes = choose_batch_sizes(RIGS, 60)
    assert sizes == [4] * 8 + [5] * 2                             # 42: all the cards hold
    assert choose_batch_sizes([card("x", 0.1, 0.1, 100, oom_at=3)], 10) == [2]  # below a measured OOM


@pytest.mark.parametrize("global_batch", [3, 5, 7, 9])
def test_choice_is_optimal_against_brute_force(global_batch):
    curves = [TI, MAXWELL, card("mid", 0.1, 0.27, 8)]
    sizes = choose_batch_sizes(curves, global_batch)
    limits = [c.max_batch() for c in curves]
    best = min(slowest(curves, s) for s in itertools.product(*(range(1, m + 1) for m in limits))
               if sum(s) == global_batch)
    assert sum(sizes) == global_batch and slowest(curves, sizes) == pytest.approx(best)


def test_calibrated_copy_keeps_every_comment_and_changes_only_batch_keys():
    text = (ROOT / "hosts.yaml").read_text()
    new = with_batch_sizes(text, {0: [3, 3, 2, 2, 2], 1: [2, 2, 2], 2: [2, 1]})
    h = parse_hosts(new)
    assert [x.batch_sizes for x in h.hosts] == [(3, 3, 2, 2, 2), (2, 2, 2), (2, 1)]
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert [line for line in old_lines if "#" in line and "batch_size" not in line] == \
           [line for line in new_lines if "#" in line and "batch_size" not in line]
    changed = [line for line in new_lines if line not in old_lines]
    assert changed == ["    batch_sizes: [3, 3, 2, 2, 2]", "    batch_sizes: [2, 2, 2]",
                       "    batch_sizes: [2, 1]        # one per GPU, in `gpus` order (FASHIONSEG_LOCAL_BATCH_SIZES=1,1)"]
    flow = "hosts:\n  - {name: a, address: x, gpus: 2, batch_size: 1}  # c\n  - {name: b, address: y, gpus: [0]}\n"
    assert with_batch_sizes(flow, {0: [2, 3], 1: [4]}) == (
        "hosts:\n  - {name: a, address: x, gpus: 2, batch_sizes: [2, 3]}  # c\n"
        "  - {name: b, address: y, gpus: [0], batch_sizes: [4]}\n")


@pytest.mark.slow
def test_calibrate_probes_each_host_on_cpu_and_writes_a_valid_copy(tmp_path):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("# my rig\nhosts:\n  - name: box   # the only one\n    address: localhost\n"
                     "    gpus: 2\n    batch_size: 3\n")
    out = tmp_path / "calibrated.yaml"
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "calibrate", str(hosts), "--out", str(out),
                        "--batch-sizes", "1,2", "--steps", "1", "--", "--config", "configs/debug.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "launcher calibrate: per-rank batch sizes" in r.stdout and "cpu" in r.stdout
    assert "global batch 6 -> 6" in r.stdout
    (box,) = load_hosts(out).hosts
    assert sorted(box.batch_sizes) == [3, 3]  # two identical "cards": the same share each
    assert out.read_text() == "# my rig\nhosts:\n  - name: box   # the only one\n    address: localhost\n" \
                              "    gpus: 2\n    batch_sizes: [3, 3]\n"


@pytest.mark.gpu
def test_probe_on_a_gpu_measures_memory_that_grows_with_the_batch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from launcher.calibrate import curves_from_probe
    from launcher.probe import probe

    result = probe({"config": "configs/debug.yaml", "overrides": [], "batch_sizes": [1, 2, 4], "steps": 2, "warmup": 1,
                    "num_classes": 47, "num_attributes": 294})
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    assert {d["name"] for d in result["devices"]} == names       # one probe per distinct GPU model
    points = result["devices"][0]["points"]
    assert [p["batch"] for p in points] == [1, 2, 4] and not any(p["oom"] for p in points)
    peaks = [p["peak_memory"] for p in points]
    assert 0 < peaks[0] < peaks[1] < peaks[2] < result["devices"][0]["total_memory"]
    curve = curves_from_probe(result)[result["devices"][0]["name"]]
    assert curve.max_batch() >= 4 and all(p["step_time"] > 0 for p in points)
