"""The parts of bench/gpu_suite.py, each run in its own process group with a deadline.

    python bench/gpu_parts.py PART CONTEXT.json RESULT.json

CONTEXT (written by gpu_suite.py) holds the profile, the data paths, the results of the parts
before this one and `deadline` (time.time() by which the part must be done). RESULT gets this
part's dict; it is rewritten as figures arrive, so a part killed at its deadline still leaves what
it measured. Training goes through the real trainer (`python -m fashionseg.train`, figures read from
RUN/metrics.jsonl), the peer through bench/precision.py, inference through `fashionseg predict`.
An override the config does not know (e.g. `train.channels_last` before the trainer has it) makes
that run "unsupported", never a crash.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# optional overrides: a config that rejects them marks the run unsupported (see `unsupported_key`)
OPTIONAL_KEYS = ("train.channels_last", "data.decode_device")


# -- processes -------------------------------------------------------------------------------------
def run_cmd(cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None) -> dict:
    """Run `cmd`; at `timeout` seconds kill it and every process under it (torchrun starts its
    workers in sessions of their own, so the process group alone is not enough).
    Returns {"rc", "seconds", "out" (stdout+stderr), "timed_out"}; the output is appended to `log`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(proc.pid)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild still holds the pipe: give up on the rest
            out = ""
    seconds = time.perf_counter() - t0
    if log is not None:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}\n# rc={proc.returncode} {seconds:.1f}s"
                    f"{' TIMED OUT' if timed_out else ''}\n{(out or '')[-6000:]}\n")
    return {"rc": proc.returncode, "seconds": seconds, "out": out or "", "timed_out": timed_out}


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and all its descendants."""
    try:
        import psutil

        procs = psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already, or no psutil: the group kill below still runs
        procs = []
    for p in procs:
        try:
            p.kill()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def error_text(res: dict, lines: int = 6) -> str:
    """What a failed command said: our commands' `error: ...` line, else the last exception line of
    a traceback, else its last lines."""
    if res["timed_out"]:
        return f"timed out after {res['seconds']:.0f} s"
    text = [l.strip() for l in res["out"].splitlines() if l.strip()]
    ours = [l for l in text if l.startswith("error:")]
    if ours:
        return ours[-1][len("error:"):].strip()[:1500]
    exc = [l for l in text if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*:", l)]
    if exc:
        return exc[-1][:1500]
    return " | ".join(text[-lines:])[-1500:] or f"exit code {res['rc']}"


def unsupported_key(out: str, overrides: list[str]) -> str | None:
    """The optional override key a config rejected as unknown, if that is why the run failed."""
    for o in overrides:
        key = o.split("=", 1)[0]
        leaf = key.split(".")[-1]
        if key in OPTIONAL_KEYS and re.search(rf"(unknown|unexpected|extra)[^\n]{{0,20}}{re.escape(leaf)}"
                                              rf"|{re.escape(leaf)}[\s\S]{{0,80}}?(unknown|unexpected|extra inputs|not permitted)",
                                              out, re.IGNORECASE):
            return key
    return None


# -- the trainer arm -----------------------------------------------------------------------------
def summarize_metrics(rows: list[dict], warm_steps: int) -> dict:
    """images/s, data-wait share and peak memory over the logged intervals after `warm_steps`
    (weighted by each interval's wall time; the last interval alone if none is later)."""
    rows = [r for r in rows if "images_per_sec" in r and "step" in r]
    if not rows:
        return {}
    kept, prev = [], 0
    for r in rows:
        n = r["step"] - prev
        prev = r["step"]
        if r["step"] > warm_steps:
            kept.append((r, n))
    kept = kept or [(rows[-1], 1)]
    dt = [r.get("step_time", 0.0) * n for r, n in kept]
    total = sum(dt)
    ips = sum(r["images_per_sec"] * d for (r, _), d in zip(kept, dt)) / total if total > 0 else kept[-1][0]["images_per_sec"]
    wait = (sum(r.get("data_wait_frac", 0.0) * d for (r, _), d in zip(kept, dt)) / total if total > 0
            else kept[-1][0].get("data_wait_frac"))
    mem = [r["max_mem_mb"] for r in rows if r.get("max_mem_mb") is not None]
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    return {"images_per_sec": ips, "data_wait_frac": wait, "peak_mem_mb": max(mem) if mem else None,
            "timed_steps": sum(n for _, n in kept), "last_loss": losses[-1] if losses else None,
            "skipped_steps": rows[-1].get("skipped_steps")}


def train_overrides(ctx: dict, *, precision: str, workers: int, steps: int | None = None, extra: list[str] = ()) -> list[str]:
    p = ctx["profile"]
    return [*p["train_overrides"], "eval.every_epochs=0", "eval.at_end=false", "log.log_with=[]", "log.rich=false",
            f"log.every={p['log_every']}", "train.checkpoint_every=1000000", "train.deterministic=false",
            f"train.batch_size={p['batch']}", f"train.max_steps={steps or p['steps']}", f"train.precision={precision}",
            f"data.workers={workers}", *extra]


def config_rejects(ctx: dict, overrides: list[str]) -> str | None:
    """The optional key (OPTIONAL_KEYS) the run config rejects, found by loading the config here
    (no trainer started for a run that cannot be); None when it loads or fails for another reason."""
    if not any(o.split("=", 1)[0] in OPTIONAL_KEYS for o in overrides):
        return None
    try:
        from fashionseg.train import config as config_lib

        config_lib.load(str(ROOT / ctx["profile"]["config"]), overrides)
    except Exception as e:  # noqa: BLE001 - whatever the config layer raises for an unknown key
        return unsupported_key(str(e), overrides)
    return None


def trainer_run(ctx: dict, name: str, overrides: list[str], *, launcher: list[str] | None = None,
                timeout: float | None = None) -> dict:
    """One `python -m fashionseg.train` run (at most `timeout` s and the part's deadline); its
    figures from metrics.jsonl, or why there are none."""
    out = Path(ctx["work"]) / "runs" / name
    key = config_rejects(ctx, overrides)
    if key:
        return {"run": name, "run_dir": str(out), "status": "unsupported", "unsupported_key": key,
                "error": f"the config rejects {key}"}
    cmd = [*(launcher or [PY]), "-m", "fashionseg.train", "--config", str(ROOT / ctx["profile"]["config"]),
           "--shards", ctx["shards"], "--out", str(out), *overrides]
    res = run_cmd(cmd, min(_left(ctx), timeout or float("inf")), Path(ctx["log"]))
    row: dict[str, Any] = {"run": name, "seconds": round(res["seconds"], 1), "run_dir": str(out)}
    if res["rc"] != 0 or res["timed_out"]:
        key = None if res["timed_out"] else unsupported_key(res["out"], overrides)
        row.update(status="unsupported" if key else ("timeout" if res["timed_out"] else "error"),
                   error=f"the config rejects {key}" if key else error_text(res))
        if key:
            row["unsupported_key"] = key
        return row
    metrics = out / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
    summary = summarize_metrics(rows, ctx["profile"]["warm_steps"])
    if not summary:
        row.update(status="error", error=f"{metrics} has no images_per_sec rows")
        return row
    row.update(status="ok", **summary)
    return row


class Result:
    """The part's result dict, written to disk after every change (a killed part keeps its figures)."""

    def __init__(self, path: str, **init: Any) -> None:
        self.path, self.data = Path(path), dict(init)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def add(self, key: str, value: Any) -> Any:
        self.data.setdefault(key, []).append(value)
        self.save()
        return value

    def set(self, **kv: Any) -> None:
        self.data.update(kv)
        self.save()


def _left(ctx: dict) -> float:
    return ctx["deadline"] - time.time()


# -- parts -------------------------------------------------------------------------------------------
def part_gpu_tests(ctx: dict, res: Result) -> None:
    """`pytest -m gpu` over tests/test_gpu_*.py; counts and each test's outcome from its JUnit XML."""
    import xml.etree.ElementTree as ET

    junit = Path(ctx["work"]) / "gpu_tests.xml"
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu_*.py"))
    r = run_cmd([PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *files],
                _left(ctx), Path(ctx["log"]))
    res.set(rc=r["rc"], seconds=round(r["seconds"], 1))
    if not junit.is_file():
        res.set(status="timeout" if r["timed_out"] else "error", error=error_text(r))
        return
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome, message = ("failed" if kind == "failure" else kind), (el.get("message") or "")[:300]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k + ("s" if k == "error" else ""): sum(t["outcome"] == k for t in tests)
              for k in ("passed", "failed", "error", "skipped")}
    res.set(status="ok" if r["rc"] in (0, 5) and not counts["failed"] and not counts["errors"] else "failed",
            **counts, tests=tests)


def part_train(ctx: dict, res: Result) -> None:
    """Trainer and peer images/s and peak memory per precision x channels_last, and their ratio."""
    p = ctx["profile"]
    workers = p["train_workers"]
    res.set(status="running", size=p["size"], batch=p["batch"], workers=workers, config=p["config"])
    order = [(pr, cl) for cl in p["channels_last"] for pr in p["precisions"]]  # channels_last=off first
    cl_unsupported = None
    peer_json = Path(ctx["work"]) / "peer.json"
    for i, (precision, cl) in enumerate(order):
        if cl and cl_unsupported:
            res.add("trainer", {"arm": "trainer", "precision": precision, "channels_last": True,
                                "status": "unsupported", "error": cl_unsupported})
            continue
        extra = ["train.channels_last=true"] if cl else []
        row = trainer_run(ctx, f"train_{precision}_{'cl' if cl else 'nchw'}",
                          train_overrides(ctx, precision=precision, workers=workers, extra=extra),
                          timeout=max(60.0, _left(ctx) / 2))  # a hang leaves the peer and the rest half
        row.update(arm="trainer", precision=precision, channels_last=cl, workers=workers)
        res.add("trainer", row)
        if cl and row["status"] == "unsupported":
            cl_unsupported = row["error"]
        if i == len(p["precisions"]) - 1:  # the plain runs are in: the peer next, then channels_last
            _peer(ctx, res, peer_json)
    if "peer" not in res.data:
        _peer(ctx, res, peer_json)
    res.set(trainer_vs_peer=ratios(res.data.get("trainer", []), res.data.get("peer", [])), status="ok")


def _peer(ctx: dict, res: Result, path: Path) -> None:
    p = ctx["profile"]
    cmd = [PY, str(ROOT / "bench" / "precision.py"), "--device", p["device"], "--config", str(ROOT / p["config"]),
           "--size", str(p["size"]), "--batch", str(p["batch"]), "--steps", str(p["peer_steps"]),
           "--warmup", str(p["peer_warmup"]), "--precisions", *p["precisions"],
           "--channels-last", "both" if True in p["channels_last"] else "off", "--data", "coco", "--coco", ctx["peer_coco"],
           "--workers", str(p["train_workers"]), "--json", str(path), *[o for o in p["train_overrides"] if o.startswith("model.")]]
    r = run_cmd(cmd, _left(ctx), Path(ctx["log"]))
    rows = json.loads(path.read_text()) if path.is_file() else []
    for row in rows:
        row.update(arm="peer", status="ok")
    res.set(peer=rows)
    if r["rc"] != 0 or r["timed_out"]:
        res.set(peer_error=error_text(r))


def ratios(trainer: list[dict], peer: list[dict]) -> dict:
    """Per precision: trainer/peer images/s with both in NCHW, and the trainer's best format vs the
    peer's NCHW (the reference has no channels_last)."""
    def ips(rows, precision, cl=None):
        vals = [r["images_per_sec"] for r in rows if r.get("status") == "ok" and r["precision"] == precision
                and (cl is None or r["channels_last"] == cl) and r.get("images_per_sec")]
        return max(vals) if vals else None

    out = {}
    for precision in sorted({r["precision"] for r in trainer + peer}):
        t, t_best, q = ips(trainer, precision, False), ips(trainer, precision), ips(peer, precision, False)
        out[precision] = {"trainer_vs_peer": t / q if t and q else None,
                          "trainer_best_vs_peer": t_best / q if t_best and q else None}
    return out


def part_data_wait(ctx: dict, res: Result) -> None:
    """Data-wait share of a step at data.workers W (the shipped config's precision), and GPU decode."""
    p = ctx["profile"]
    precision = p["data_wait_precision"]
    done = {(r["precision"], r["workers"]): r for r in (ctx["results"].get("train") or {}).get("trainer", [])
            if not r.get("channels_last") and r.get("status") == "ok"}
    res.set(status="running", precision=precision, cores=os.cpu_count(), shipped_workers=p["shipped_workers"])
    for w in p["data_wait_workers"]:
        if (precision, w) in done:
            row = {**done[(precision, w)], "reused": "train"}
        else:
            row = trainer_run(ctx, f"wait_w{w}", train_overrides(ctx, precision=precision, workers=w))
        res.add("rows", {"workers": w, **{k: row.get(k) for k in ("status", "data_wait_frac", "images_per_sec",
                                                                    "peak_mem_mb", "error", "reused", "seconds")}})
    res.set(decode=decode_bench(ctx))
    w = min(p["data_wait_workers"])
    row = trainer_run(ctx, f"wait_w{w}_gpudecode",
                      train_overrides(ctx, precision=precision, workers=w, extra=[f"data.decode_device={p['device']}"]))
    res.set(decode_device_run={"workers": w, **{k: row.get(k) for k in ("status", "data_wait_frac", "images_per_sec",
                                                                         "error", "seconds")}}, status="ok")


def decode_bench(ctx: dict) -> dict:
    """JPEG decode images/s of the training shards' bytes: torchvision.io.decode_jpeg on one CPU
    thread vs batched on the GPU (device=p['device']; on CPU the second figure is the batched call)."""
    import torch
    from torchvision.io import decode_jpeg

    from fashionseg.data.shards.reader import iter_split

    p = ctx["profile"]
    datas = [torch.frombuffer(bytearray(jpg), dtype=torch.uint8) for _, jpg, _ in iter_split(ctx["shards"], "train")]
    datas = datas[: p["decode_images"]]
    torch.set_num_threads(1)
    out: dict[str, Any] = {"images": len(datas)}
    t0 = time.perf_counter()
    for d in datas:
        decode_jpeg(d)
    out["cpu_images_per_sec"] = len(datas) / (time.perf_counter() - t0)
    device = torch.device(p["device"])
    try:
        decode_jpeg(datas[: p["batch"]], device=device)  # warm-up (nvjpeg handle)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(0, len(datas), p["batch"]):
            decode_jpeg(datas[i:i + p["batch"]], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["device_images_per_sec"] = len(datas) / (time.perf_counter() - t0)
        out["device"] = str(device)
    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
        out["device_error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def part_deepspeed(ctx: dict, res: Result) -> None:
    """DeepSpeed ZeRO-2 through the trainer under torchrun (1 process), per precision; the exact
    error where it does not run."""
    p = ctx["profile"]
    res.set(status="running")
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    for i, precision in enumerate(p["ds_precisions"]):
        if _left(ctx) < 5:
            res.add("rows", {"precision": precision, "status": "skipped", "error": "no time left"})
            continue
        row = trainer_run(ctx, f"ds_{precision}", train_overrides(
            ctx, precision=precision, workers=p["train_workers"], steps=p["ds_steps"],
            extra=["train.backend=deepspeed", "train.zero_stage=2"]), launcher=launcher,
            timeout=_left(ctx) / (len(p["ds_precisions"]) - i))  # a hang leaves the other precisions their share
        res.add("rows", {"precision": precision, "zero_stage": 2, **{k: row.get(k) for k in (
            "status", "images_per_sec", "peak_mem_mb", "last_loss", "skipped_steps", "error", "seconds")}})
    res.set(status="ok")


def part_inference(ctx: dict, res: Result) -> None:
    """`fashionseg predict` images/s on the val split: single scale, --tta, and folded (if there)."""
    import importlib.util

    p = ctx["profile"]
    res.set(status="running")
    weights = None
    for row in (ctx["results"].get("train") or {}).get("trainer", []):
        w = Path(row.get("run_dir", "")) / "model_final.pth"
        if row.get("status") == "ok" and w.is_file():
            weights = w
            if row.get("precision") == p["data_wait_precision"]:
                break
    if weights is None:  # the train part left none: make one (a few steps)
        row = trainer_run(ctx, "infer_weights", train_overrides(ctx, precision="fp32", workers=0, steps=2))
        w = Path(row["run_dir"]) / "model_final.pth"
        weights = w if w.is_file() else None
    if weights is None:
        res.set(status="error", error="no weights file: the training runs all failed")
        return
    thresh = [] if p["infer_score_thresh"] is None else ["--score-thresh", str(p["infer_score_thresh"])]
    res.set(weights=str(weights), split="val", batch=p["infer_batch"], score_thresh=p["infer_score_thresh"],
            note="score_thresh 0: every image yields detections_per_img detections (worst-case mask pasting)"
            if p["infer_score_thresh"] == 0 else "")
    help_text = predict_help(ctx)
    modes: list[tuple[str, list[str]]] = [("single", []), ("tta", ["--tta", *p["tta_flags"]])]
    has_fold = importlib.util.find_spec("fashionseg.model.fold") is not None
    if has_fold and "--no-fold" in help_text:
        modes += [("unfolded", ["--no-fold"])]
    if has_fold and re.search(r"--fold\b", help_text):
        modes += [("folded", ["--fold"])]
    res.set(fold="absent" if not has_fold else ("switch" if len(modes) > 2 else
            "fashionseg.model.fold exists but predict has no --fold/--no-fold switch: 'single' runs predict's default"))
    for name, flags in modes:
        if name == "tta" and "--tta" not in help_text:
            res.add("rows", {"mode": name, "status": "unsupported", "error": "predict has no --tta"})
            continue
        out = Path(ctx["work"]) / f"predict_{name}"
        r = run_cmd([PY, "-m", "fashionseg.cli", "predict", "--weights", str(weights), ctx["shards"], "--split", "val",
                     "--out", str(out), "--no-overlays", "--no-progress", "--device", p["device"],
                     "--batch-size", str(p["infer_batch"]), *thresh, *flags], _left(ctx), Path(ctx["log"]))
        text = " ".join(r["out"].split())
        m = re.search(r"(\d+) images, (\d+) detections.*?\(([\d.]+) images/s\)", text)
        if r["rc"] == 0 and m:
            res.add("rows", {"mode": name, "status": "ok", "images": int(m.group(1)), "detections": int(m.group(2)),
                             "images_per_sec": float(m.group(3)), "seconds": round(r["seconds"], 1)})
        else:
            res.add("rows", {"mode": name, "status": "timeout" if r["timed_out"] else "error", "error": error_text(r)})
    res.set(status="ok")


def predict_help(ctx: dict) -> str:
    """`fashionseg predict --help` (built here from its parser: one Python start less)."""
    import argparse

    try:
        from fashionseg.eval import predict

        parser = argparse.ArgumentParser(prog="fashionseg predict")
        predict.add_arguments(parser)
        return parser.format_help()
    except Exception:  # noqa: BLE001 - the module moved or changed: ask the command itself
        return run_cmd([PY, "-m", "fashionseg.cli", "predict", "--help"], min(60, _left(ctx)))["out"]


PARTS = {"gpu_tests": part_gpu_tests, "train": part_train, "data_wait": part_data_wait,
         "deepspeed": part_deepspeed, "inference": part_inference}


def main() -> int:
    name, ctx_path, result_path = sys.argv[1:4]
    ctx = json.loads(Path(ctx_path).read_text())
    res = Result(result_path, status="running")
    PARTS[name](ctx, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
