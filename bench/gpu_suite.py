"""The GPU suite (issue 14): one command, ~8 minutes on one GPU, a table on stdout and a JSON file.

    bash bench/gpu_suite.sh [--smoke] [--out DIR] [--parts train,inference] [--budget SECONDS]

Parts, in order, each in its own process group with its own deadline (bench/gpu_parts.py); a part
that fails or runs out of time records its error and the suite goes on:
  gpu_tests  `pytest -m gpu tests/test_gpu_*.py`
  train      trainer (`python -m fashionseg.train`) and peer (bench/precision.py, a bare
             torchvision-reference loop with a CocoDetection DataLoader) images/s and peak memory,
             fp32/fp16/bf16 x channels_last off/on, `trainer_vs_peer` per precision
  data_wait  data-wait share at data.workers 4/6/8/12, decode_jpeg on CPU vs GPU, data.decode_device
  deepspeed  ZeRO-2 with fp16, bf16 (and fp32) through the trainer under torchrun
  inference  `fashionseg predict` images/s single scale, --tta, folded (if that module exists)
`--smoke` runs the same code on the CPU at 64 px with the debug config in about a minute (CI).
Data: `shard synth` + `shard build` into a temporary folder, and the same training images as
loose JPEGs + a COCO JSON for the peer. Output: DIR/gpu_suite.json, DIR/gpu_suite.txt (the table),
DIR/gpu_suite_log.txt (every command with the end of its output). DIR defaults to $OUT, else ./out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from gpu_parts import PARTS, PY, error_text, run_cmd  # noqa: E402

SHIPPED = "configs/fashionpedia_r50.yaml"


def shipped_workers() -> int:
    return int((yaml.safe_load((ROOT / SHIPPED).read_text()).get("data") or {}).get("workers", 6))


def profile(smoke: bool) -> dict:
    """What the suite runs: full (R50-FPN at 1024 px on the GPU) or smoke (the same code on the CPU)."""
    if smoke:
        return {
            "name": "smoke", "device": "cpu", "config": "configs/debug.yaml", "images": 24, "size": 64,
            "val_fraction": 0.25, "samples_per_shard": 8, "batch": 2, "steps": 2, "log_every": 1, "warm_steps": 1,
            "precisions": ["fp32"], "channels_last": [False, True], "train_workers": 0, "shipped_workers": 0,
            "data_wait_precision": "fp32", "data_wait_workers": [0], "decode_images": 8,
            "peer_steps": 2, "peer_warmup": 1, "ds_precisions": ["bf16"], "ds_steps": 2, "infer_batch": 2,
            "infer_score_thresh": None,  # the config's: a 2-step model then keeps few detections
            "train_overrides": ["data.min_size=[64]", "data.max_size=64", "train.lr=0.002", "train.max_nonfinite=1000"],
            # a ceiling: ~1 min on an idle 2-core box, but a loaded one takes 10-20 s per Python start
            "frozen_bn": True, "budget": 240, "concurrent": ["gpu_tests", "deepspeed"], "tta_flags": ["--tta-scales", "1.0"],
            "parts": {"gpu_tests": 40, "train": 60, "data_wait": 25, "deepspeed": 35, "inference": 40},
        }
    w = shipped_workers()
    return {
        "name": "full", "device": "cuda", "config": SHIPPED, "images": 160, "size": 1024,
        "val_fraction": 0.25, "samples_per_shard": 32, "batch": 4, "steps": 25, "log_every": 5, "warm_steps": 10,
        "precisions": ["fp32", "fp16", "bf16"], "channels_last": [False, True], "train_workers": w, "shipped_workers": w,
        "data_wait_precision": "fp16", "data_wait_workers": sorted({4, w, 8, 12}), "decode_images": 96,
        "peer_steps": 15, "peer_warmup": 4, "ds_precisions": ["fp16", "bf16", "fp32"], "ds_steps": 15, "infer_batch": 4,
        "infer_score_thresh": 0.0,  # every image yields detections_per_img detections: worst-case pasting
        # no weights can be fetched there: model.pretrained becomes calibrated_backbone()'s file (the
        # override below stands where that fails); a small lr keeps the fresh heads finite
        "train_overrides": ["model.pretrained=null", "data.min_size=[1024]", "data.max_size=1024", "train.lr=0.002",
                            "train.max_nonfinite=1000"],
        "frozen_bn": True, "budget": 470, "concurrent": [], "tta_flags": [],
        "parts": {"gpu_tests": 100, "train": 190, "data_wait": 75, "deepspeed": 60, "inference": 50},
    }


def prepare_data(work: Path, p: dict, log: Path) -> dict:
    """`shard synth` + `shard build`, and the training split as loose JPEGs + COCO JSON (the peer)."""
    shard = [PY, "-c", "import sys; from fashionseg.cli import shard_main; sys.exit(shard_main())"]
    src, shards = work / "synth", work / "shards"
    t0 = time.perf_counter()
    for cmd in ([*shard, "synth", str(src), "--images", str(p["images"]), "--size", str(p["size"]), "--seed", "0"],
                [*shard, "build", str(src), str(shards), "--val-fraction", str(p["val_fraction"]),
                 "--samples-per-shard", str(p["samples_per_shard"]), "--workers", str(min(16, os.cpu_count() or 1)),
                 "--no-progress"]):
        r = run_cmd(cmd, 300, log)
        if r["rc"] != 0:
            raise RuntimeError(f"{cmd[3]}: {error_text(r)}")
    from fashionseg.data.shards.reader import iter_split, read_manifest
    from fashionseg.data.vocab import Vocab

    manifest = read_manifest(shards)
    vocab = Vocab.from_dict(manifest, str(shards / "manifest.json"))
    coco_dir = work / "peer_coco"
    (coco_dir / "images").mkdir(parents=True)
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i, "name": str(i)} for i in range(1, vocab.num_categories + 1)],
                  "attributes": [{"id": j, "name": str(j)} for j in range(vocab.num_attributes)]}
    for i, (key, jpg, meta) in enumerate(iter_split(shards, "train")):
        name = f"{i:06d}.jpg"
        (coco_dir / "images" / name).write_bytes(jpg)
        coco["images"].append({"id": i, "file_name": name, "height": meta["height"], "width": meta["width"]})
        for inst in meta["instances"]:  # labels and attribute indices as the model sees them
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i, "category_id": vocab.category_index(inst["category_id"]),
                "attribute_ids": [vocab.attribute_index(a) for a in inst.get("attribute_ids", ())],
                "segmentation": inst["segmentation"], "bbox": inst["bbox"], "area": inst["area"], "iscrowd": 0})
    (coco_dir / "instances.json").write_text(json.dumps(coco))
    splits = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    pretrained = calibrated_backbone(work, p) if p["frozen_bn"] else None
    return {"shards": str(shards), "peer_coco": str(coco_dir), "splits": splits, "pretrained": pretrained,
            "seconds": round(time.perf_counter() - t0, 1)}


def calibrated_backbone(work: Path, p: dict) -> str | None:
    """A stand-in for ImageNet weights (none can be downloaded there): the config's ResNet with
    random weights whose BatchNorm statistics are measured on random normalised images, saved in
    the ImageNet layout. With it as `model.pretrained` the model is built as the real recipe is:
    FrozenBatchNorm2d and `trainable_backbone_layers` trainable (without weights everything trains,
    with plain BatchNorm), and FrozenBatchNorm's fp32 buffers meet DeepSpeed's halved parameters.
    Frozen statistics of random weights would let activations grow layer by layer (inf in fp16)."""
    import torch
    import torchvision

    backbone = (yaml.safe_load((ROOT / p["config"]).read_text()).get("model") or {}).get("backbone", "resnet50_fpn")
    arch = backbone.split("_")[0]
    if not arch.startswith("resnet"):
        return None
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    net.train()
    side = min(224, p["size"])
    with torch.no_grad():
        for _ in range(2):
            net((torch.rand(8, 3, side, side) - 0.45) / 0.225)
    path = work / f"{arch}_random_calibrated.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def environment(p: dict) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cores": os.cpu_count(), "host": platform.node(), "profile": p["name"],
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from importlib import metadata
    for pkg in ("torchvision", "accelerate", "deepspeed", "pycocotools", "webdataset", "pydantic"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


def run_part(name: str, ctx: dict, timeout: float, work: Path) -> dict:
    """One part in its own process group; whatever it wrote by the deadline, plus why it stopped."""
    ctx = {**ctx, "deadline": time.time() + timeout}
    ctx_path, result_path = work / f"{name}.ctx.json", work / f"{name}.json"
    ctx_path.write_text(json.dumps(ctx, default=str))
    r = run_cmd([PY, str(ROOT / "bench" / "gpu_parts.py"), name, str(ctx_path), str(result_path)], timeout + 15,
                Path(ctx["log"]))
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {}
    if r["timed_out"] or r["rc"] != 0 or result.get("status") in (None, "running"):
        result["status"] = "timeout" if r["timed_out"] or result.get("status") == "running" else "error"
        result.setdefault("error", error_text(r))
    result["part_seconds"] = round(r["seconds"], 1)
    return result


# -- the table ------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def targets(results: dict) -> dict:
    """The three figures of issue 14 against their targets (None where not measured)."""
    tr = results.get("train") or {}
    ok = [r for r in tr.get("trainer", []) if r.get("status") == "ok"]

    def best(precision):
        rows = [r for r in ok if r["precision"] == precision]
        return max(rows, key=lambda r: r["images_per_sec"]) if rows else None

    out: dict = {}
    fp32 = best("fp32")
    for p in ("fp16", "bf16"):
        b = best(p)
        speed = b["images_per_sec"] / fp32["images_per_sec"] if b and fp32 else None
        mem = b["peak_mem_mb"] / fp32["peak_mem_mb"] if b and fp32 and b.get("peak_mem_mb") and fp32.get("peak_mem_mb") else None
        out[f"{p}_vs_fp32"] = {"speedup": speed, "peak_mem_ratio": mem,
                               "met": None if speed is None else bool(speed >= 1.5 and (mem is None or mem < 1.0))}
    tvp = {k: v["trainer_vs_peer"] for k, v in (tr.get("trainer_vs_peer") or {}).items()}
    out["trainer_vs_peer"] = {"values": tvp, "met": (all(v >= 1.0 for v in tvp.values() if v is not None)
                                                     if any(v is not None for v in tvp.values()) else None)}
    dw = results.get("data_wait") or {}
    shipped = [r for r in dw.get("rows", []) if r.get("workers") == dw.get("shipped_workers") and r.get("status") == "ok"]
    frac = shipped[0]["data_wait_frac"] if shipped else None
    out["data_wait_shipped_config"] = {"workers": dw.get("shipped_workers"), "data_wait_frac": frac,
                                       "met": None if frac is None else bool(frac < 0.05)}
    return out


def _md(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table (the output is meant to be pasted into docs/benchmarks.md)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def _why(row: dict, n: int = 160) -> str:
    return row.get("status", "?") + (f": {row['error'][:n]}" if row.get("error") else "")


def table(report: dict) -> str:
    """The report as Markdown: a header line (machine, torch, command), one section per part, targets."""
    env, res, p = report["env"], report["results"], report["profile"]
    lines = [f"GPU suite ({env['profile']}): {env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"python {env['python']}, {env['cores']} cores, {report['seconds']:.0f} s; `{report.get('command', '')}`"]
    for name in report["parts"]:
        r = res.get(name) or {}
        lines += ["", f"### {name}: {r.get('status', 'not run')} ({_f(r.get('part_seconds'), '{:.0f}')} s)"
                  + (f"; error: {r['error']}" if r.get("error") and not isinstance(r.get("error"), int) else ""), ""]
        if name == "gpu_tests" and "tests" in r:
            lines.append(f"passed {r['passed']}, failed {r['failed']}, errors {r['errors']}, skipped {r['skipped']}")
            lines += [f"- {t['outcome']} `{t['test']}`: {t['message'][:160]}" for t in r["tests"] if t["outcome"] != "passed"]
        if name == "train":
            lines.append(f"`{p['config']}`, {p['size']} px, batch {p['batch']}, data.workers {p['train_workers']}, "
                         f"{p['steps']} steps (first {p['warm_steps']} not timed); peer: {p['peer_steps']} timed steps")
            lines.append("")
            lines += _md(["arm", "precision", "channels_last", "images/s", "peak MiB", "data wait", "status"],
                         [[row["arm"], row["precision"], "on" if row["channels_last"] else "off",
                           _f(row.get("images_per_sec"), "{:.2f}"), _f(row.get("peak_mem_mb"), "{:.0f}"),
                           _f(row.get("data_wait_frac"), "{:.1%}"), _why(row, 100)]
                          for row in r.get("trainer", []) + r.get("peer", [])])
            lines.append("")
            lines += [f"- trainer_vs_peer[{k}] = {_f(v['trainer_vs_peer'], '{:.2f}')} (trainer's best format: "
                      f"{_f(v['trainer_best_vs_peer'], '{:.2f}')})" for k, v in (r.get("trainer_vs_peer") or {}).items()]
            if r.get("peer_error"):
                lines.append(f"- peer error: {r['peer_error']}")
        if name == "data_wait":
            lines += _md(["data.workers", "data wait", "images/s", "status"],
                         [[row["workers"], _f(row.get("data_wait_frac"), "{:.1%}"), _f(row.get("images_per_sec"), "{:.2f}"),
                           _why(row, 100) + (f" (the {row['reused']} run)" if row.get("reused") else "")]
                          for row in r.get("rows", [])])
            d, g = r.get("decode") or {}, r.get("decode_device_run")
            if d:
                lines.append(f"\n- decode_jpeg over {d.get('images')} shard JPEGs: CPU (1 thread) "
                             f"{_f(d.get('cpu_images_per_sec'))} images/s, {d.get('device', 'device')} (batched) "
                             f"{_f(d.get('device_images_per_sec'))} images/s" + (f"; {d['device_error'][:160]}" if d.get("device_error") else ""))
            if g:
                lines.append(f"- data.decode_device={p['device']} at data.workers {g['workers']}: data wait "
                             f"{_f(g.get('data_wait_frac'), '{:.1%}')}, {_f(g.get('images_per_sec'), '{:.2f}')} images/s, {_why(g)}")
        if name == "deepspeed":
            lines += _md(["ZeRO-2", "images/s", "peak MiB", "status"],
                         [[row["precision"], _f(row.get("images_per_sec"), "{:.2f}"), _f(row.get("peak_mem_mb"), "{:.0f}"),
                           _why(row, 400)] for row in r.get("rows", [])])
        if name == "inference":
            lines.append(f"`fashionseg predict` on {res.get('inference', {}).get('split', 'val')}, batch {p['infer_batch']}"
                         + (", score_thresh 0 (detections_per_img detections per image)" if p.get("infer_score_thresh") == 0 else ""))
            lines.append("")
            lines += _md(["mode", "images", "images/s", "status"],
                         [[row["mode"], row.get("images", "-"), _f(row.get("images_per_sec"), "{:.2f}"), _why(row, 200)]
                          for row in r.get("rows", [])])
            if r.get("fold"):
                lines.append(f"\n- conv-BN folding: {r['fold']}")
    lines += ["", "### targets", ""]
    lines += _md(["figure", "value", "target", "met"], _target_rows(report["targets"]))
    return "\n".join(lines)


def _target_rows(t: dict) -> list[list]:
    rows = []
    for p in ("fp16", "bf16"):
        v = t[f"{p}_vs_fp32"]
        rows.append([f"{p} vs fp32 images/s (peak memory)", f"{_f(v['speedup'], '{:.2f}x')} ({_f(v['peak_mem_ratio'], '{:.2f}x')})",
                     ">= 1.5x at < 1x memory", v["met"]])
    v = t["trainer_vs_peer"]
    rows.append(["trainer_vs_peer", ", ".join(f"{k} {_f(x, '{:.2f}')}" for k, x in v["values"].items()) or "-", ">= 1.0", v["met"]])
    v = t["data_wait_shipped_config"]
    rows.append([f"data wait, shipped config (data.workers {v['workers']})", _f(v["data_wait_frac"], "{:.1%}"), "< 5%", v["met"]])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at 64 px (about a minute)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="where the JSON and table go (default $OUT, else ./out)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default: the profile's)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (runs, shards)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a profile entry (JSON or YAML value; parts.NAME for a part's seconds), e.g. "
                         "--set steps=15 --set 'precisions=[\"bf16\"]' --set parts.train=250")
    args = ap.parse_args()
    t_start = time.time()
    p = profile(args.smoke)
    for item in args.set:
        key, _, raw = item.partition("=")
        where, leaf = (p["parts"], key.split(".", 1)[1]) if key.startswith("parts.") else (p, key)
        if leaf not in where:
            ap.error(f"--set {item}: no profile entry '{key}' (entries: {', '.join(sorted(p))})")
        try:
            where[leaf] = json.loads(raw)
        except ValueError:
            where[leaf] = yaml.safe_load(raw)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)} (choose from {', '.join(PARTS)})")
    budget = args.budget or p["budget"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_suite_log.txt"
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    report: dict = {"env": environment(p), "profile": p, "parts": parts, "results": {}, "work": str(work),
                    "command": " ".join(["bash bench/gpu_suite.sh", *sys.argv[1:]])}
    print(f"GPU suite ({p['name']}): parts {', '.join(parts)}; budget {budget:.0f} s; work {work}", flush=True)

    def save() -> str:
        report["seconds"] = time.time() - t_start
        report["targets"] = targets(report["results"])
        text = table(report)
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_suite.txt").write_text(text + "\n")
        return text

    try:
        try:
            data = prepare_data(work, p, log)
        except Exception as e:  # noqa: BLE001 - without data no part can run; say so in the JSON
            data = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1500]}
        report["data"] = data
        if data.get("pretrained"):  # trainer and peer build the model as the real recipe does (calibrated_backbone)
            p["train_overrides"] = [o for o in p["train_overrides"] if not o.startswith("model.pretrained=")] + \
                [f"model.pretrained={data['pretrained']}"]
        ctx = {"profile": p, "work": str(work), "log": str(log), **data}
        lock = threading.Lock()  # results are shared with the side thread

        def sequence(names: list[str]) -> None:
            for i, name in enumerate(names):
                if "error" in data:
                    report["results"][name] = {"status": "error", "error": "no data: " + data["error"]}
                    continue
                left = budget - (time.time() - t_start)
                later = sum(p["parts"][n] for n in names[i + 1:])
                timeout = max(5.0, min(p["parts"][name] * 1.5, left - 0.6 * later))
                print(f"[{time.time() - t_start:5.0f} s] {name} (up to {timeout:.0f} s) ...", flush=True)
                with lock:
                    part_ctx = {**ctx, "results": dict(report["results"])}
                result = run_part(name, part_ctx, timeout, work)
                with lock:
                    report["results"][name] = result
                    save()  # what is done so far survives a kill of the whole suite
                print(f"[{time.time() - t_start:5.0f} s] {name}: {result.get('status')}", flush=True)

        # smoke: parts that need no other part's result run beside the others (CPU figures mean
        # nothing anyway); on the GPU everything runs alone, one part after the other
        side = [n for n in parts if n in p["concurrent"]]
        with ThreadPoolExecutor(max_workers=1) as pool:
            beside = pool.submit(sequence, side)
            sequence([n for n in parts if n not in side])
            beside.result()
    finally:
        text = save()
        print(text)
        print(f"\nwrote {out / 'gpu_suite.json'}, {out / 'gpu_suite.txt'}, {log}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
