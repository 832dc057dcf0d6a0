"""report.json of `shard build`: totals, problems grouped by reason, every problem, warnings.

Every entry of `problems` has the keys of `Problem` (sources/records.py): {action, reason,
image_id (the source's name for the image), where, bad, instances}, `instances` being how many
source instances the entry lost. Only `bad` drops count towards --max-bad-fraction.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from fashionseg.data.sources.records import DROP_ATTRIBUTE, DROP_IMAGE, DROP_INSTANCE, REPAIRED, Problem, Source


def reason_kind(reason: str) -> str:
    """Group reasons for the summary table: drop details in parentheses, numbers -> N."""
    return re.sub(r"\d+", "N", reason.split(" (")[0])


def make_report(source: Source, problems: list[Problem], *, samples: int, instances: int, shards: int, shards_reused: int,
                workers: int, processed: int, elapsed: float, warnings: list[str]) -> dict:
    dropped = [p for p in problems if p.action in (DROP_INSTANCE, DROP_IMAGE)]
    lost_bad = sum(p.instances for p in dropped if p.bad)
    reasons = Counter((p.action, reason_kind(p.reason)) for p in problems)
    totals = {
        "source_images": len(source.images), "source_instances": source.num_rows,
        "samples": samples, "instances": instances,
        "dropped_images": sum(1 for p in problems if p.action == DROP_IMAGE),
        "dropped_instances": sum(p.instances for p in dropped),
        "bad_instances": lost_bad,
        "repaired": sum(1 for p in problems if p.action == REPAIRED),
        "dropped_attributes": sum(1 for p in problems if p.action == DROP_ATTRIBUTE),
        "bad_fraction": lost_bad / max(1, source.num_rows),
        "shards": shards, "shards_reused": shards_reused,
        "elapsed_s": round(elapsed, 3), "workers": workers,
        "images_per_s": round(processed / elapsed, 2) if elapsed > 0 else None,
    }
    return {"source": str(source.path), "format": source.format, "totals": totals,
            "reasons": [{"action": a, "reason": r, "count": n} for (a, r), n in sorted(reasons.items())],
            "warnings": warnings, "problems": [p.to_json() for p in problems]}


def print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = report["totals"]
    table = Table(title=f"shard build {out}")
    table.add_column("")
    table.add_column("count", justify="right")
    for label, key in (("source images", "source_images"), ("source instances", "source_instances"), ("samples written", "samples"),
                       ("instances written", "instances"), ("dropped images", "dropped_images"), ("dropped instances", "dropped_instances"),
                       ("repaired", "repaired"), ("dropped attribute ids", "dropped_attributes")):
        table.add_row(label, str(t[key]))
    table.add_row("bad fraction", f"{t['bad_fraction']:.2%}")
    table.add_row("images/s", f"{t['images_per_s']}" if t["images_per_s"] is not None else "-")
    console = Console(stderr=True)
    console.print(table)
    if report["reasons"]:
        rt = Table(title="problems by reason (details in report.json)")
        rt.add_column("action")
        rt.add_column("reason")
        rt.add_column("count", justify="right")
        for r in report["reasons"]:
            rt.add_row(r["action"], r["reason"], str(r["count"]))
        console.print(rt)
    for w in report.get("warnings", ()):
        console.print(f"[yellow]warning:[/] {w}")
