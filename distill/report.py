"""The evaluation report: a headline table, ``report.md`` and PNG plots next to the student."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .io import atomic_write_text, write_json

HEADLINE = ("params_image", "params_text", "zero_shot_top1", "i2t_r1", "t2i_r1", "fidelity", "knn10_overlap",
            "unk_share", "macs_image", "latency_ms_b1", "images_per_s")


def _fmt(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if col.startswith("params") or col.startswith("macs"):
        return f"{v / 1e6:.2f}M"
    if col == "images_per_s":
        return f"{v:,.0f}"
    if col == "latency_ms_b1":
        return f"{v:.2f}"
    return f"{v:.3f}"


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """Teacher, student and their ratio for the headline metrics present in ``results``."""
    t, s = results["teacher"], results["student"]
    cols = [c for c in HEADLINE if (c in t or c in s) and not (c.startswith("params") and not (t.get(c) or s.get(c)))]
    cols += [c for c in t if c.endswith(("_r1", "_r5")) and c not in cols and c not in
             ("i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")]  # cross-lingual retrieval (<lang>_r1, <lang>_t2i_r1)
    rows = [("teacher", [_fmt(c, t.get(c)) for c in cols]), ("student", [_fmt(c, s.get(c)) for c in cols])]
    ratio = [f"{s[c] / t[c]:.2f}" if isinstance(t.get(c), (int, float)) and isinstance(s.get(c), (int, float))
             and t.get(c) else "-" for c in cols]
    rows.append(("student/teacher", ratio))
    if markdown:
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(v) + " |" for n, v in rows]
        return "\n".join(lines)
    head = f"{'model':<16}" + "".join(f"{c:>15}" for c in cols)
    return "\n".join([head, "-" * len(head)] + [f"{n:<16}" + "".join(f"{x:>15}" for x in v) for n, v in rows])


def _loss_history(run_dir: Path | None) -> list[dict[str, float]]:
    log = run_dir / "log.jsonl" if run_dir else None
    if not log or not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def write_report(results: dict[str, Any], out_dir: str | Path, run_dir: str | Path | None = None,
                 title: str = "Student vs teacher") -> Path:
    """Write ``report.md``, ``results.json`` and ``loss.png`` / ``per_class.png`` / ``cosine_hist.png``
    (those with data) into ``out_dir``, a new folder or an earlier report, replaced whole; returns the
    report path."""
    from .outputs import REPORT, claim, staged

    claim(out_dir, "an evaluation report", same=(REPORT,))
    with staged(out_dir) as tmp:
        _write_report(results, tmp, run_dir, title)
    return Path(out_dir) / "report.md"


NOT_LOSS = ("step", "lr", "elapsed_s", "data_wait", "stage")  # log.jsonl fields that are not loss terms


def _write_report(results: dict[str, Any], out: Path, run_dir: str | Path | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(out / "results.json", results)
    md = [f"# {title}", "", format_table(results, markdown=True), ""]
    history = _loss_history(Path(run_dir) if run_dir else None)
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = [k for k in history[0] if k not in NOT_LOSS]
        for k in keys:
            ax.plot([h["step"] for h in history], [h.get(k) for h in history], label=k)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title("training loss")
        fig.tight_layout(), fig.savefig(out / "loss.png", dpi=100), plt.close(fig)
        md += ["## Training loss", "", "![loss](loss.png)", ""]
    if results.get("per_class"):
        names = list(results["per_class"])
        t = [results["per_class"][c]["teacher"] for c in names]
        s = [results["per_class"][c]["student"] for c in names]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], t, width=0.4, label="teacher")
        ax.bar([i + 0.2 for i in x], s, width=0.4, label="student")
        ax.set_xticks(list(x), names, rotation=70, fontsize=7), ax.set_ylabel("top-1"), ax.legend()
        ax.set_title("zero-shot accuracy per class")
        fig.tight_layout(), fig.savefig(out / "per_class.png", dpi=100), plt.close(fig)
        md += ["## Zero-shot accuracy per class", "", "![per class](per_class.png)", "",
               "| class | teacher | student |", "|---|---|---|"]
        md += [f"| {c} | {a:.3f} | {b:.3f} |" for c, a, b in zip(names, t, s)] + [""]
    if results.get("cosines"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(results["cosines"], bins=40, range=(min(-0.05, min(results["cosines"])), 1.0))
        ax.set_xlabel("cosine(student, teacher)"), ax.set_ylabel("samples"), ax.set_title("fidelity")
        fig.tight_layout(), fig.savefig(out / "cosine_hist.png", dpi=100), plt.close(fig)
        md += ["## Student-teacher cosine", "", "![cosines](cosine_hist.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
