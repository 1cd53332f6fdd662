"""The model card's "Robustness" section (RUN_DIR/README.md), rewritten atomically after each attack run."""

from __future__ import annotations

from pathlib import Path

from erase.storage import atomic_write_text

HEADING = "## Robustness"


def budget_text(budget: dict, defaults: dict) -> str:
    """The settings that differ from the attack's defaults ("defaults" when none do)."""
    changed = [f"{k.replace('_', '-')} {v}" for k, v in budget.items() if defaults.get(k) != v]
    return ", ".join(changed) or "defaults"


def section(summary: dict, budgets: dict, defaults: dict) -> str:
    n = summary["prompts"]
    judge = summary["judge"]
    lines = [HEADING, "",
             f"Attacks on {n} prompt{'s' if n != 1 else ''} ({summary['prompt_set']}), judged by "
             f"`{judge['evaluator']}` ({judge['rule']}). pre-ASR: the plain prompt's image already shows the concept; "
             "ASR: the plain or an attacked image does; adversarial: an attacked image does, the plain one left out "
             "(per cent of prompts; details in `attacks/robustness.json`).", "",
             "| attack | prompts | pre-ASR | ASR | adversarial ASR | budget | grid |", "|---|---:|---:|---:|---:|---|---|"]
    for name, rates in summary["attacks"].items():
        lines.append(f"| {name} | {n} | {rates['pre_asr']:.1f} | {rates['asr']:.1f} | {rates['adversarial_asr']:.1f} | "
                     f"{budget_text(budgets[name], defaults[name])} | [grid](attacks/{name}/grid.png) |")
    u = summary["union"]
    lines.append(f"| union | {n} | {u['pre_asr']:.1f} | {u['asr']:.1f} | {u['adversarial_asr']:.1f} | | |")
    return "\n".join(lines) + "\n"


def write_card_section(run_dir: Path, summary: dict, budgets: dict, defaults: dict) -> None:
    """Replace the card's Robustness section (or add it before the resolved configuration, or at the end)."""
    card = run_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    new = section(summary, budgets, defaults)
    if HEADING + "\n" in text:
        start = text.index(HEADING + "\n")
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + new + ("\n" + text[end + 1:] if end >= 0 else "")
    elif "\n## Resolved configuration" in text:
        at = text.index("\n## Resolved configuration") + 1
        text = text[:at] + new + "\n" + text[at:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + new
    atomic_write_text(text, card)
