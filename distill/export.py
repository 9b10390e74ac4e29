"""Deployable exports of a trained student, gated by accuracy.

Formats: ``safetensors`` (weights + config, fp32/fp16/bf16), ``onnx`` (FP32), ``onnx-fp16`` and
``onnx-int8`` (onnxruntime dynamic quantisation, or static calibrated on part of the user's data),
and other libraries' own layouts (:mod:`distill.interop`): ``open_clip`` (``local-dir:``),
``sentence-transformers`` and ``timm`` (+ transformers' TimmWrapper). Every format but safetensors
re-embeds parity inputs (the user's data, or generated stand-ins) with the exported model, loaded by
its own runtime, and with the PyTorch student, writes the parity table (``parity.json`` /
``parity.md``) into the export folder and fails with :class:`ExportGateError` when the mean cosine
or the 1st-percentile cosine (one broken sample cannot hide in the mean) is under the format's gate
(:data:`GATES`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ExportError, ExportGateError  # noqa: F401  (importable from here too)
from .interop import FORMATS as _REGISTRY
from .interop import get_format
from .interop.onnx import OPSET, parity  # noqa: F401  (importable from here too)
from .interop.pair import pair_with_teacher_text  # noqa: F401  (importable from here too)
from .interop.parity import CALIBRATION_TEXTS, agreement, calibration_inputs  # noqa: F401
from .io import atomic_write_text, write_json

log = logging.getLogger(__name__)

FORMATS = tuple(_REGISTRY.list())
INTEROP = ("open_clip", "sentence-transformers", "timm")  # other libraries' own layouts
GATES = {name: get_format(name).gate for name in FORMATS if get_format(name).gate is not None}
THRESHOLDS = {fmt: gate[0] for fmt, gate in GATES.items()}  # mean-cosine gates (kept for callers)


@dataclass
class ExportResult:
    path: Path
    format: str
    files: dict[str, int] = field(default_factory=dict)  # file -> bytes
    parity: dict[str, Any] = field(default_factory=dict)


def _parity_table(fmt: str, gate: tuple[float, float], result: dict[str, Any]) -> str:
    lines = [f"# Export parity: {fmt} vs PyTorch FP32", "",
             f"gate: mean cosine >= {gate[0]} and 1st-percentile cosine >= {gate[1]}", "",
             "| output | samples | mean cosine | 1st pct cosine | min cosine | max abs err |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in _checked(result).items():
        lines.append(f"| {name} | {r['n']} | {r['mean_cosine']:.6f} | {r['p1_cosine']:.6f} | {r['min_cosine']:.6f} "
                     f"| {r['max_abs_err']:.2e} |")
    if "zero_shot_top1" in result:
        z = result["zero_shot_top1"]
        lines += ["", f"zero-shot top-1: PyTorch {z['pytorch']:.4f}, export {z['onnx']:.4f} (delta {z['delta']:+.4f})"]
    if "preprocess" in result:
        p = result["preprocess"]
        lines += ["", f"preprocess: the student's embeddings of {p['n']} images through its own eval transform and "
                  f"through the export's own preprocessing (config {', '.join(p['keys'])} the same: "
                  f"{p['config_match']}; max pixel difference {p['max_pixel_diff']:.3g})"]
    if "calibration" in result:
        c = result["calibration"]
        where = ("images of the calibration data (--calibration-data)" if c.get("source") == "calibration data"
                 else f"images, none of them among the {c['parity_images']} verified here")
        lines += ["", f"static INT8 calibrated on {c['images']} {where}"]
    return "\n".join(lines) + "\n"


def _checked(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The gated entries of a parity result: those with cosine statistics."""
    return {k: v for k, v in result.items() if isinstance(v, dict) and "p1_cosine" in v}


def gate_failures(result: dict[str, Any], gate: tuple[float, float]) -> list[str]:
    """What fails the gate, one phrase per failing statistic."""
    bad = []
    for name, r in _checked(result).items():
        name = {"preprocess": "the export's own preprocessing"}.get(name) or (
            name.replace("image", "image tower", 1) if name.startswith("image") else f"{name} tower")
        if not r["mean_cosine"] >= gate[0]:
            bad.append(f"{name} mean cosine {r['mean_cosine']:.5f} < {gate[0]}")
        if not r["p1_cosine"] >= gate[1]:
            bad.append(f"{name} 1st-percentile cosine {r['p1_cosine']:.5f} < {gate[1]} (min {r['min_cosine']:.5f})")
    if result.get("preprocess", {}).get("config_match") is False:
        bad.append(f"preprocess config differs from the student's: {result['preprocess']['export']}")
    return bad


# -- entry point ---------------------------------------------------------------------------------------
def export(student: Any, out: str | Path, format: str = "onnx", towers: Sequence[str] | None = None,
           data: Any = None, dtype: str = "fp32", quantization: str = "dynamic", threshold: float | None = None,
           gate: bool = True, opset: int = OPSET, low_threshold: float | None = None,
           overwrite: bool = False, inputs: dict[str, Any] | None = None, calibration: Any = None) -> ExportResult:
    """Export a student (object or saved folder) to ``out``.

    Args:
        format: ``safetensors``, ``onnx``, ``onnx-fp16``, ``onnx-int8``, ``open_clip``,
            ``sentence-transformers`` or ``timm``.
        towers: ``("image", "text")`` subset (default: every tower the student has; safetensors and ONNX).
        data: parity data (a path or Rows); generated stand-ins when None. Static INT8 calibrates on
            other images of it than the parity check uses.
        dtype: safetensors weight dtype (``fp32``, ``fp16``, ``bf16``).
        quantization: ``dynamic`` or ``static`` (INT8; static calibrates the image tower on ``data``).
        threshold / low_threshold: minimum mean / 1st-percentile cosine to the PyTorch student
            (default per format, see :data:`GATES`).
        gate: raise :class:`ExportGateError` when under a gate (the parity table is written anyway).
        overwrite: replace another clip-distill artifact at ``out`` (never the student's own folder or
            one that holds an input; a folder with other files is always refused).
        inputs: other files or folders the export reads (``{what: path}``), which ``out`` must not hold.
        calibration: images static INT8 calibrates on (a path or Rows; default: other images of ``data``
            than those the gate verifies), so the gate can run on held-out data.

    ``out`` is written whole: the export is built in a staging folder beside it and takes its place when
    complete. An export that fails its gate is left at ``out`` only when nothing was there before.

    Example:
        >>> export("runs/vit_tiny/student", "export/vit_tiny_int8", format="onnx-int8", data="val.csv")
        >>> export(paired, "export/oc", format="open_clip")  # open_clip.create_model_and_transforms("local-dir:export/oc")
    """
    from .card import evaluation_of, write_card
    from .interop import load_student
    from .outputs import claim, staged

    if format not in FORMATS:
        raise ExportError(f"format {format!r}: use one of {FORMATS}")
    fmt = get_format(format)
    source = None
    if not hasattr(student, "encode_image"):
        source = student
        student = load_student(student)
    inputs = {"the student being exported": source, "the parity data": data if isinstance(data, (str, Path)) else None,
              "the calibration data": calibration if isinstance(calibration, (str, Path)) else None, **(inputs or {})}
    student = copy.deepcopy(student).cpu().float().eval() if fmt.gate is not None else student
    have = [t for t in ("image", "text") if getattr(student, t) is not None]
    if towers and not fmt.towers:
        raise ExportError(f"--towers applies to safetensors and ONNX; the {format} format takes the towers it holds")
    towers = list(towers or have)
    missing = [t for t in towers if t not in have]
    if missing:
        raise ExportError(f"--towers {','.join(towers)}: the student has no {' or '.join(missing)} tower (it has {have})")
    out = Path(out)
    held = claim(out, f"a {format} export", inputs, overwrite=overwrite)
    options = dict(towers=towers, data=data, dtype=dtype, quantization=quantization, opset=opset,
                   calibration=calibration)
    evaluation = evaluation_of(source or inputs.get("the student being exported"))
    if fmt.gate is None:  # the student's own weights: nothing to compare
        with staged(out) as tmp:
            fmt.write(student, tmp, **options)
            write_card(tmp, _exported(student, towers), format, evaluation, usage=fmt.usage)
        return ExportResult(out, format, _files(out))
    limits = (fmt.gate[0] if threshold is None else threshold, fmt.gate[1] if low_threshold is None else low_threshold)
    with staged(out) as tmp:
        result = fmt.write(student, tmp, **options)
        write_json(tmp / "parity.json", {"format": format, "threshold": limits[0], "low_threshold": limits[1],
                                         "low_statistic": "1st-percentile cosine", **result})
        atomic_write_text(tmp / "parity.md", _parity_table(format, limits, result))
        write_card(tmp, _exported(student, towers), format, evaluation, result, limits, fmt.usage)
        if fmt.relocate is not None:
            fmt.relocate(tmp, out)  # what the layout records of its place points where it is about to be
        bad = gate_failures(result, limits) if gate else []
        if bad and held is not None:  # a failed export never replaces one that was there
            raise _gate_error(out, fmt, bad, f"{out} still holds the previous export")
    if bad:
        raise _gate_error(out, fmt, bad, f"table in {out / 'parity.md'}")
    return ExportResult(out, format, _files(out), result)


def _exported(student: Any, towers: Sequence[str]) -> Any:
    """The student as the export holds it (the towers it wrote), for its model card."""
    if all(getattr(student, t) is None or t in towers for t in ("image", "text")):
        return student
    kept = copy.copy(student)
    for tower in ("image", "text"):
        if tower not in towers:
            kept._modules[tower] = None
    return kept


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


def _gate_error(out: Path, fmt: Any, bad: list[str], where: str) -> ExportGateError:
    return ExportGateError(f"{out}: {fmt.name} export fails the accuracy gate: {'; '.join(bad)} against the PyTorch "
                           f"student ({where}). {fmt.hint}".rstrip())


