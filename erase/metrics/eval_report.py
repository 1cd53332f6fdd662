"""``report.md`` (+ ``plot.png``) for an evaluation: numbers where people read, bars and grids where they look."""

from __future__ import annotations

import os
from pathlib import Path

from erase.storage import atomic_path, atomic_write_text


def _cell(v) -> str:
    return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def summary_table(result: dict) -> list[str]:
    models = list(result["summary"])
    keys = []
    for m in models:
        keys += [k for k in result["summary"][m] if k not in keys]
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    lines += [f"| {k} | " + " | ".join(_cell(result["summary"][m].get(k)) for m in models) + " |" for k in keys]
    return lines


def _evaluator_line(title: str, info: dict) -> str:
    parts = [f"**{title}**: {info.get('name')}", f"version {info.get('version')}", f"weights {info.get('weights_source')}"]
    if info.get("threshold") is not None:
        parts.append(f"threshold {info['threshold']}")
    parts.append(f"input: {info.get('input_convention')}")
    return "- " + "; ".join(parts)


def write_plot(result: dict, path: Path) -> Path | None:
    """Per-concept accuracy and NudeNet counts per class, one bar per model."""
    # lazy: matplotlib is slow to import and only plots need it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import and only plots need it
    import matplotlib.pyplot as plt

    panels = []
    if "concept_accuracy" in result:
        panels.append(("concept accuracy (%)", result["concept_accuracy"]["per_concept"]))
    if "nudenet" in result:
        counts = {m: {k.replace("_EXPOSED", "").lower(): v for k, v in c.items() if k.endswith("_EXPOSED")}
                  for m, c in result["nudenet"]["counts"].items()}
        panels.append(("NudeNet exposed detections", counts))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (title, data) in zip(axes[:, 0], panels):
        models = list(data)
        labels = list(next(iter(data.values())).keys()) if data else []
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            ax.bar([j + i * width for j in range(len(labels))], [data[m].get(k) or 0 for k in labels], width, label=m)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        top = max([v or 0 for m in models for v in data[m].values()] + [0])
        ax.set_ylim(0, 105 if "%" in title else max(1, top * 1.15))  # a fixed scale: zero bars read as zero
        ax.set_title(title + ("" if top else " — none"))
        ax.legend(fontsize=8)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def write_report(result: dict, out: Path, title: str, grids: list[Path]) -> Path:
    out = Path(out)
    lines = [f"# {title}", "", *summary_table(result), ""]
    ca = result.get("concept_accuracy")
    if ca:
        models = list(ca["per_concept"])
        concepts = list(next(iter(ca["per_concept"].values())))
        lines += ["## Concept accuracy", "", f"{ca['definition']}."
                  + (f" Erased concept: **{ca['concept']}** (UA = 100 - its accuracy)." if "concept" in ca else ""), "",
                  "| concept | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines += [f"| {c} | " + " | ".join(_cell(ca["per_concept"][m].get(c)) for m in models) + " |" for c in concepts]
        if ca["unjudged_concepts"]:
            lines.append(f"\nNot judged (unknown to the classifier): {', '.join(ca['unjudged_concepts'])}")
        lines.append("")
    nn = result.get("nudenet")
    if nn:
        models = list(nn["counts"])
        classes = [k for k in nn["counts"][models[0]] if k.endswith("_EXPOSED")]
        lines += ["## NudeNet", "", f"{nn['definition']} (threshold {nn['evaluator']['threshold']}).", "",
                  "| class | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines += [f"| {c} | " + " | ".join(str(nn["counts"][m][c]) for m in models) + " |" for c in classes]
        lines += ["| **total** | " + " | ".join(str(nn["counts"][m]["total"]) for m in models) + " |",
                  "| flagged % | " + " | ".join(_cell(nn["counts"][m]["flagged_share"]) for m in models) + " |", ""]
    if write_plot(result, out / "plot.png"):
        lines += ["## Plot", "", "![per-concept accuracy and NudeNet counts](plot.png)", ""]
    if grids:
        lines += ["## Before / after", "", "Rows: base (above) and erased (below), same prompt and seeds.", ""]
        lines += [f"### {g.stem}\n\n![{g.stem}]({Path(os.path.relpath(g, out)).as_posix()})\n" for g in grids]
    lines += ["## Evaluators", ""]
    for key, title_ in (("fid", "FID"), ("concept_accuracy", "concept accuracy"), ("nudenet", "NudeNet"),
                        ("clip_score", "CLIP score")):
        if key in result:
            lines.append(_evaluator_line(title_, result[key]["evaluator"]))
    if "fid" in result:
        lines.append(f"- FID reference: {result['fid']['reference']} ({result['fid']['reference_images']} images)")
    for key, why in result.get("skipped", {}).items():
        lines.append(f"- {key} not computed: {why}")
    gen = ", `generation.json` of the images" if result.get("generation") else ""
    lines += ["", f"Generation and metric settings: `metrics.json`{gen}.", ""]
    path = out / "report.md"
    atomic_write_text("\n".join(lines), path)
    return path
