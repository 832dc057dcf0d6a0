"""rich tables of a metrics dict (score.score_results' layout), shared by `eval` and `score`."""
from __future__ import annotations


def _pct(v, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def summary_table(metrics: dict, title: str = "COCO metrics"):
    """Rows bbox / segm (pycocotools), columns AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100 (%)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("type")
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
    for c in cols:
        table.add_column(c, justify="right")
    for name in ("bbox", "segm"):
        m = metrics.get(name)
        if m:
            table.add_row(name, *(_pct(m.get(k)) for k in cols))
    return table


FP_TABLES = (("iou_f1", "IoU+F1"), ("iou_only", "IoU only"), ("f1_only", "F1 only"))
FP_LABELS = {"APo": "APo (outerwear)", "APa": "APa (accessory)", "APp": "APp (part)"}


def fashionpedia_table(metrics: dict):
    """The official evaluator's three tables side by side, a row per figure, in its order."""
    from rich.table import Table

    attr = metrics.get("attribute_categories") or {}
    tables = [(key, label) for key, label in FP_TABLES if metrics.get(key)]
    table = Table(title=f"AP^{{IoU+F1}} in % ({metrics.get('iou_f1_type', 'segm')} IoU; attribute categories: "
                        f"{attr.get('set', '?')}, {len(attr.get('ids', []))} ids)")
    table.add_column("figure")
    for _, label in tables:
        table.add_column(label, justify="right")
    figures = [k for k in metrics[tables[0][0]]] if tables else []
    for key, _ in tables[1:]:
        figures += [k for k in metrics[key] if k not in figures]
    figures = [f for f in figures if f not in FP_LABELS] + [f for f in FP_LABELS if f in figures]  # groups last
    for fig in figures:
        table.add_row(FP_LABELS.get(fig, fig), *("" if fig not in metrics[key] else _pct(metrics[key][fig])
                                                 for key, _ in tables))
    return table


def category_table(metrics: dict, categories: list[dict], title: str = "per-category AP (%): box, mask, AP^{IoU+F1}"):
    """Per category with ground truth: count, bbox/segm AP and AP50, and AP^{IoU+F1} (for a
    category without attributes the IoU-only AP, marked *, which is what enters the mean)."""
    from rich.table import Table

    table = Table(title=title, caption="* no attributes: IoU-only AP", show_lines=False)
    # short headers, one line per category: the table fits an 80-column terminal
    for col in ("id", "category", "GT", "box AP", "AP50", "mask AP", "AP50", "IoU+F1 AP"):
        if col == "category":
            table.add_column(col, justify="left", no_wrap=True, overflow="ellipsis", max_width=18)
        else:
            table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    counts = metrics.get("gt_counts", {})
    box = metrics.get("bbox", {}).get("per_category", {})
    seg = metrics.get("segm", {}).get("per_category", {})
    fp = metrics.get("fashionpedia_per_category", {})
    for cat in categories:
        key = str(cat["id"])
        n = counts.get(key, 0)
        if not n:
            continue
        entry = fp.get(key) or {}
        if "iou_f1" in entry:
            fp_ap = _pct(entry["iou_f1"].get("AP"), 1)
        elif "iou_only" in entry:
            fp_ap = _pct(entry["iou_only"].get("AP"), 1) + "*"
        else:
            fp_ap = "-"
        table.add_row(key, cat.get("name", key), str(n), _pct(box.get(key, {}).get("AP"), 1),
                      _pct(box.get(key, {}).get("AP50"), 1), _pct(seg.get(key, {}).get("AP"), 1),
                      _pct(seg.get(key, {}).get("AP50"), 1), fp_ap)
    return table


def print_metrics(metrics: dict, categories: list[dict], console=None) -> None:
    from rich.console import Console

    console = console or Console()
    head = f"{metrics.get('split') or metrics.get('results', '')}: {metrics['num_images']} images, " \
           f"{metrics['num_detections']} detections"
    if metrics.get("grid"):
        head += f", {metrics['grid']} grid"
    console.print(summary_table(metrics, title=f"{head} (AP in %)"))
    if metrics.get("iou_f1"):
        console.print(fashionpedia_table(metrics))
    console.print(category_table(metrics, categories))
