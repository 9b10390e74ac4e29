"""Model cards: the ``README.md`` of a saved student and of every export (the Hugging Face convention, YAML
metadata first). It says what the model is and how to load it, which teacher and data made it, how it did
against its teacher (the evaluation report, when there is one) and against its PyTorch self (an export's
parity table), and what it is for. Written from what the folder and the model record, nothing else."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .io import atomic_write_text, json_object
from .outputs import final_name, model_folder

CARD = "README.md"
EVAL_RESULTS = Path("eval") / "results.json"  # where ``distill eval`` writes a student's report by default

LOAD = 'from distill import load_student\nmodel = load_student("{path}")'  # a saved student; exports: Format.usage


def _towers(cfg: dict[str, Any], params: dict[str, int]) -> list[str]:
    out = []
    if "image" in cfg:
        pre = cfg["image"].get("preprocess", {})
        out.append(f"- image tower: `{cfg['image'].get('arch', '?')}` at {pre.get('image_size', '?')} px"
                   + (f", {params['image'] / 1e6:.2f}M parameters" if params.get("image") else ""))
    if "text" in cfg:
        text = cfg["text"]
        out.append(f"- text tower: `{text.get('arch', '?')}`, context {text.get('context_length', '?')} "
                   "tokens" + (f", {params['text'] / 1e6:.2f}M parameters" if params.get("text") else ""))
        if text.get("narrowed"):
            n = text["narrowed"]
            out.append(f"  - narrowed to hidden size {n['hidden_size']} ({n['num_heads']} heads), FFN "
                       f"{n['intermediate_size']}: the pretrained encoder's most important ones, by {n['by']}")
        if text.get("trimmed_vocab"):
            v = text["trimmed_vocab"]
            out.append(f"  - vocabulary trimmed to the {v['kept']:,} of {v['of']:,} tokens its training text uses "
                       f"(at least {v['min_count']} times); [UNK] share on that text: {v['unk_share']:.2%}. Text in "
                       "another alphabet reads as [UNK]")
    return out


def _teacher(identity: dict[str, Any] | None) -> list[str]:
    if not identity:
        return ["Not recorded (a student saved before it was trained, or made outside `distill fit`)."]
    shown = {k: v for k, v in identity.items() if k in ("backend", "name", "weights", "embed_dim", "image_size")}
    return [f"`{json.dumps(shown)}`"]


def _trained(prov: dict[str, Any] | None) -> list[str]:
    if not prov:
        return ["Not recorded."]
    d, lines = prov.get("data") or {}, []
    if d:
        lines.append(f"- data: `{d.get('source')}`: {d.get('rows', 0):,} rows ({d.get('images', 0):,} images, "
                     f"{d.get('captions', 0):,} captions; {d.get('held_out', 0):,} held out for health checks), "
                     f"fingerprint `{d.get('fingerprint')}`")
    if "steps" in prov:
        lines.append(f"- steps: {prov['steps']}, finished {prov.get('date', '?')}")
    if prov.get("text_tower"):
        lines.append(f"- text tower: {prov['text_tower']}")
    if prov.get("recipe"):
        import yaml

        lines += ["- recipe (what differs from the defaults):", "", "```yaml",
                  yaml.safe_dump(prov["recipe"], sort_keys=False).rstrip(), "```"]
    return lines


def _evaluation(results: dict[str, Any] | None) -> list[str]:
    if not results or "teacher" not in results or "student" not in results:
        return ["Not evaluated yet: `distill eval --student <this folder> --data <held-out pairs>` writes the report "
                "and this section."]
    from .report import format_table

    return [format_table(results, markdown=True), "",
            "Measured by `distill eval` on the user's held-out data, teacher and student in one run."]


def _parity(fmt: str, parity: dict[str, Any] | None, gate: tuple[float, float] | None) -> list[str]:
    rows = {k: v for k, v in (parity or {}).items() if isinstance(v, dict) and "mean_cosine" in v}
    if not rows:
        return []
    lines = ["## Agreement with the PyTorch student", "",
             "| output | samples | mean cosine | 1st-percentile cosine |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['n']} | {v['mean_cosine']:.5f} | {v['p1_cosine']:.5f} |" for k, v in rows.items()]
    if gate:
        lines += ["", f"Gate: mean >= {gate[0]}, 1st percentile >= {gate[1]} (details in `parity.md`)."]
    return lines + [""]


def _limits(cfg: dict[str, Any], prov: dict[str, Any] | None, fmt: str) -> list[str]:
    lines = ["- Embeds images and text into its teacher's space, for retrieval, photo search and zero-shot "
             "classification with prompts. It imitates that teacher: it knows what the teacher knew as far as the "
             "training data showed it, shares its biases, and is no better than it."]
    data = (prov or {}).get("data") or {}
    if data.get("source"):
        lines.append(f"- Quality was measured only where the report above says; images and captions unlike "
                     f"`{data['source']}` may fare worse than the table shows.")
    if "text" not in cfg:
        lines.append("- Image tower only: pair it with its teacher's text tower (`distill export --pair-teacher`) "
                     "to search or classify by text.")
    else:
        lines.append("- The text tower reads the languages its tokenizer and training captions covered.")
    if "int8" in fmt:
        lines.append("- INT8 weights and activations: rankings agree with the FP32 model within the gate above, "
                     "single scores differ slightly.")
    lines.append("- Not for decisions about people (identity, attributes, surveillance).")
    return lines


def model_card(folder: str | Path, cfg: dict[str, Any], fmt: str = "saved model", params: dict[str, int] | None = None,
               evaluation: dict[str, Any] | None = None, parity: dict[str, Any] | None = None,
               gate: tuple[float, float] | None = None, usage: str = LOAD) -> str:
    """The card's text. ``cfg``: the student's config (``Student.config()``); ``fmt``: ``saved model`` or an
    export format; ``evaluation``: a ``distill eval`` results dict; ``parity``: an export's parity result;
    ``usage``: Python that loads the folder (``{path}`` for it)."""
    prov = cfg.get("trained")
    teacher = (cfg.get("teacher") or {}).get("name")
    pipeline = "zero-shot-image-classification" if "image" in cfg else "sentence-similarity"
    front = ["---", "library_name: clip-distill", f"pipeline_tag: {pipeline}",
             "tags: [clip, knowledge-distillation, image-text-retrieval" + (f", {fmt}" if fmt != "saved model" else "")
             + "]", "---", ""]
    name = final_name(folder)
    lines = [*front, f"# {name}", "",
             f"A clip-distill student ({fmt}), distilled from `{teacher or 'an unrecorded teacher'}` into "
             f"{cfg.get('embed_dim', '?')}-dimensional embeddings.", "", *_towers(cfg, params or {}), "",
             "```python", usage.format(path=name), "```", "",
             "## Teacher", "", *_teacher(cfg.get("teacher")), "",
             "## Training", "", *_trained(prov), "",
             "## Evaluation against the teacher", "", *_evaluation(evaluation), "",
             *_parity(fmt, parity, gate),
             "## Intended use and limits", "", *_limits(cfg, prov, fmt), ""]
    return "\n".join(lines)


def write_card(folder: str | Path, student: Any, fmt: str = "saved model", evaluation: dict[str, Any] | None = None,
               parity: dict[str, Any] | None = None, gate: tuple[float, float] | None = None,
               usage: str = LOAD) -> Path:
    """Write ``README.md`` into ``folder`` (a staging folder is named by its target) for ``student``: its
    config, towers and parameter counts."""
    params = {t: student.num_params(t) for t in ("image", "text") if getattr(student, t, None) is not None}
    text = model_card(folder, student.config(), fmt, params, evaluation, parity, gate, usage or LOAD)
    path = Path(folder) / CARD
    atomic_write_text(path, text)
    return path


def evaluation_of(folder: str | Path | None) -> dict[str, Any] | None:
    """The ``distill eval`` results a student folder (or a run folder's student) holds at the report's
    default place, or None."""
    if folder is None or not isinstance(folder, (str, Path)):
        return None
    results = json_object(model_folder(folder) / EVAL_RESULTS)
    return results if results.get("teacher") and results.get("student") else None


def _params_in(weights: Path) -> dict[str, int]:
    """Parameters per tower from a safetensors header (no tensor is read)."""
    from safetensors import safe_open

    out: dict[str, int] = {}
    with safe_open(str(weights), framework="numpy") as f:
        for k in f.keys():
            tower = k.split(".", 1)[0]
            out[tower] = out.get(tower, 0) + math.prod(f.get_slice(k).get_shape())
    return out


def update_card(folder: str | Path, evaluation: dict[str, Any]) -> Path | None:
    """Rewrite the card of the saved student in ``folder`` with ``evaluation`` (after ``distill eval``)."""
    folder = Path(folder)
    cfg = json_object(folder / "config.json")
    if not str(cfg.get("format", "")).startswith("clip-distill-student"):
        return None
    text = model_card(folder, cfg, "saved model", _params_in(folder / "model.safetensors"), evaluation)
    path = folder / CARD
    atomic_write_text(path, text)
    return path


__all__ = ["CARD", "model_card", "write_card", "evaluation_of", "update_card"]
