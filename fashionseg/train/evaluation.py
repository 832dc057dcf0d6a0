"""Evaluation during training: fashionseg.eval's evaluator on the val split, its headline in the
log and every figure in metrics.jsonl / TensorBoard. An empty or missing split is said once and
evaluation is skipped for the rest of the run."""
from __future__ import annotations

import sys
from typing import Any


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def split_size(shard_dir, split: str) -> int:
    from fashionseg.data.shards.reader import read_manifest
    return int(read_manifest(shard_dir)["splits"].get(split, {}).get("num_samples", 0))


def evaluate_during_training(trainer) -> dict[str, float]:
    """COCO bbox/segm AP and AP^{IoU+F1} of the current weights on `eval.split` (every rank takes part)."""
    from fashionseg.eval.evaluate import evaluate_model, headline
    from fashionseg.eval.inference import inference_scale

    e, step, epoch = trainer.cfg.eval, trainer.state.step, trainer.data.last_epoch
    test_size, max_size = inference_scale(trainer.cfg.to_dict())
    model = trainer.unwrapped
    model.eval()
    try:
        result = evaluate_model(model, trainer.opts.shards, e.split, trainer.vocab, mask_thresh=trainer.cfg.model.mask_thresh,
                                batch_size=e.batch_size, device=trainer.device, accelerator=trainer.accelerator,
                                max_images=e.max_images, test_size=test_size, max_size=max_size,
                                progress=trainer.accelerator.is_main_process and sys.stdout.isatty())
    finally:
        model.train()
    result = result or {}
    if result.get("empty"):
        trainer.say(f"eval: split '{e.split}' has no images; nothing to evaluate")
        return {}
    head = headline(result)
    summary = {sec: {k: v for k, v in d.items() if k != "per_category"}
               for sec, d in result.items() if sec in ("bbox", "segm", "iou_f1", "f1_only") and d}
    # TensorBoard tags take [A-Za-z0-9_./-]: AR@100 -> AR_at100
    flat = {f"eval/{k}".replace("@", "_at"): v for k, v in {**head, **_flat_numbers(summary)}.items()}
    trainer.logger.write_row({"step": step, "epoch": epoch, **flat}, step)
    trainer.say(f"eval ({e.split}, step {step}): " + "  ".join(f"{k}={v:.4f}" for k, v in head.items()))
    return flat
