"""Deployable exports of a trained student, gated by accuracy.

Formats: ``safetensors`` (weights + config, fp32/fp16/bf16), ``onnx`` (FP32), ``onnx-fp16`` and
``onnx-int8`` (onnxruntime dynamic quantisation, or static with a calibration set from the user's
data). Every ONNX export re-embeds a calibration set with onnxruntime and with the PyTorch student,
writes the parity table (``parity.json`` / ``parity.md``) into the export folder and fails with
:class:`ExportGateError` when the mean cosine is under the format's threshold.
"""
from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._imports import require
from .io import atomic_write_text, write_json
from .runtime import ONNX_FORMAT, OnnxStudent

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx", "onnx-fp16", "onnx-int8")
THRESHOLDS = {"onnx": 0.999, "onnx-fp16": 0.99, "onnx-int8": 0.97}  # minimum mean cosine to PyTorch
OPSET = 17  # ai.onnx 17: LayerNormalization as one op; every onnxruntime >= 1.14 runs it
CALIBRATION_TEXTS = (
    "a photo of a dog", "a red car parked on the street", "two children playing football on the beach",
    "a bowl of fruit on a wooden table", "an aerial view of a city at night", "a black and white cat",
    "a man riding a bicycle", "a plate of pasta", "snow-covered mountains under a blue sky",
    "a close-up of a flower", "people waiting at a train station", "a small boat on a lake",
)


class ExportGateError(RuntimeError):
    """The exported model's embeddings are too far from the PyTorch student's."""


@dataclass
class ExportResult:
    path: Path
    format: str
    files: dict[str, int] = field(default_factory=dict)  # file -> bytes
    parity: dict[str, Any] = field(default_factory=dict)


# -- graphs ---------------------------------------------------------------------------------
def _export_onnx(student, folder: Path, towers: Sequence[str], opset: int) -> dict[str, Path]:
    """FP32 ONNX graphs with a dynamic batch (and sequence) axis; outputs are unnormalised."""
    import warnings

    student = copy.deepcopy(student).cpu().float().eval()
    paths = {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        if "image" in towers:
            size = student.preprocess.image_size
            paths["image"] = folder / "image.onnx"
            torch.onnx.export(student.image, (torch.randn(2, 3, size, size),), str(paths["image"]),
                              input_names=["pixels"], output_names=["embedding"], opset_version=opset,
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
        if "text" in towers:
            tok = student.tokenize(["a photo of a dog", "two children playing on the beach at sunset"])
            paths["text"] = folder / "text.onnx"
            torch.onnx.export(student.text, (tok["input_ids"], tok["attention_mask"]), str(paths["text"]),
                              input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"},
                                            "embedding": {0: "batch"}})
    return paths


def _to_fp16(src: Path, dst: Path) -> None:
    onnx = require("onnx", "ONNX export")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)  # FP32 in/out for callers
    onnx.save(model, str(dst))


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed pixel batches."""

    def __init__(self, pixels: np.ndarray, batch: int = 8):
        self._batches = iter([{"pixels": pixels[i:i + batch]} for i in range(0, len(pixels), batch)])

    def get_next(self):
        return next(self._batches, None)


def _to_int8(src: Path, dst: Path, tower: str, calibration: np.ndarray | None, static: bool) -> str:
    require("onnxruntime", "INT8 export")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # folds constants (BatchNorm into Conv) so every weight is an initializer, and infers shapes
    pre = src.with_name(f"{src.stem}.pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    src = pre
    if static and tower == "image":
        if calibration is None or not len(calibration):
            raise ValueError("static INT8 needs calibration images (--data)")
        # only the weight-heavy ops: quantising norms and softmax costs accuracy for no size gain
        # only the weight-heavy ops (quantising norms and softmax costs accuracy for no size gain);
        # u8 x u8: u8 x s8 saturates in the VPMADDUBSW path of CPUs without VNNI
        q.quantize_static(str(src), str(dst), _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                          op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                          weight_type=q.QuantType.QUInt8, activation_type=q.QuantType.QUInt8)
        return "static (QDQ, per-channel, calibrated)"
    # ConvInteger only takes uint8 weights; MatMul/Gather quantise to int8
    ops = ["MatMul", "Gemm", "Gather"] if tower == "text" else ["MatMul", "Gemm", "Conv"]
    q.quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops,
                       weight_type=q.QuantType.QUInt8 if tower == "image" else q.QuantType.QInt8)
    return "dynamic"


def _save_tokenizer(student, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        student.text.tokenizer.save_pretrained(tmp)
        if not (Path(tmp) / "tokenizer.json").exists():
            raise ValueError("the text tower's tokenizer has no fast (tokenizer.json) form; the ONNX runtime needs one")
        shutil.copytree(tmp, out / "tokenizer", dirs_exist_ok=True)  # for transformers users
    tok = student.text.tokenizer
    return {"file": "text.onnx", "tokenizer": "tokenizer/tokenizer.json", "context_length": student.text.context_length,
            "pad_id": int(tok.pad_token_id or 0), "pad_token": tok.pad_token or "[PAD]"}


# -- parity gate ----------------------------------------------------------------------------------
def calibration_inputs(student, data: Any = None, limit: int = 64, seed: int = 0):
    """(images: [N, 3, S, S] float32 pixels or None, texts: list[str] or None, rows or None) from the
    user's data, or generated stand-ins when no data is given."""
    from .data import as_rows, open_image
    from .transforms import eval_array

    rows = None
    images = texts = None
    if data is not None:
        rows = as_rows(data)
        pick = np.random.default_rng(seed).permutation(len(rows))[:limit]
        rows = rows.subset(sorted(pick.tolist()))
    if student.image is not None:
        if rows is not None and rows.has_images:
            images = np.stack([eval_array(open_image(p), student.preprocess) for p in rows.images if p])
        else:  # smooth random images: closer to photos than white noise
            g = np.random.default_rng(seed)
            s = student.preprocess.image_size
            low = g.uniform(0, 255, (16, 8, 8, 3)).astype(np.uint8)
            from PIL import Image

            images = np.stack([eval_array(Image.fromarray(a).resize((s, s), Image.BICUBIC), student.preprocess)
                               for a in low])
    if student.text is not None:
        texts = [c for c in rows.captions if c] if rows is not None and rows.has_text else list(CALIBRATION_TEXTS)
    return images, texts, rows


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@torch.no_grad()
def parity(student, folder: str | Path, images: np.ndarray | None, texts: Sequence[str] | None,
           rows: Any = None) -> dict[str, Any]:
    """Compare an ONNX export with the PyTorch student on the same inputs: per-tower mean/min
    cosine and max abs error of the normalised embeddings; zero-shot top-1 delta when ``rows`` has
    labels and the export has both towers."""
    onnx_model = OnnxStudent(folder)
    student = student.cpu().float().eval()
    out: dict[str, Any] = {}
    emb = {}
    if images is not None and onnx_model._image is not None:
        ref = student.encode_image(torch.from_numpy(images)).numpy()
        got = onnx_model.encode_image(images)
        c = _cos(ref, got)
        out["image"] = {"n": len(c), "mean_cosine": float(c.mean()), "min_cosine": float(c.min()),
                        "max_abs_err": float(np.abs(ref - got).max())}
        emb["image"] = (ref, got)
    if texts is not None and onnx_model._text is not None:
        ref = student.encode_text(list(texts)).numpy()
        got = onnx_model.encode_text(list(texts))
        c = _cos(ref, got)
        out["text"] = {"n": len(c), "mean_cosine": float(c.mean()), "min_cosine": float(c.min()),
                       "max_abs_err": float(np.abs(ref - got).max())}
    if rows is not None and getattr(rows, "labels", None) and "image" in emb and onnx_model._text is not None:
        prompts = [f"a photo of a {c}." for c in rows.classes]
        labels = np.array([rows.labels[i] for i, p in enumerate(rows.images) if p])
        ref_cls, got_cls = student.encode_text(prompts).numpy(), onnx_model.encode_text(prompts)
        acc_ref = float(((emb["image"][0] @ ref_cls.T).argmax(-1) == labels).mean())
        acc_got = float(((emb["image"][1] @ got_cls.T).argmax(-1) == labels).mean())
        out["zero_shot_top1"] = {"pytorch": acc_ref, "onnx": acc_got, "delta": acc_got - acc_ref}
    return out


def _parity_table(fmt: str, threshold: float, result: dict[str, Any]) -> str:
    lines = [f"# Export parity: {fmt} vs PyTorch FP32", "", f"gate: mean cosine >= {threshold}", "",
             "| tower | samples | mean cosine | min cosine | max abs err |", "| --- | --- | --- | --- | --- |"]
    for tower in ("image", "text"):
        if tower in result:
            r = result[tower]
            lines.append(f"| {tower} | {r['n']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['max_abs_err']:.2e} |")
    if "zero_shot_top1" in result:
        z = result["zero_shot_top1"]
        lines += ["", f"zero-shot top-1: PyTorch {z['pytorch']:.4f}, export {z['onnx']:.4f} (delta {z['delta']:+.4f})"]
    return "\n".join(lines) + "\n"


# -- entry point ---------------------------------------------------------------------------------------
def export(student: Any, out: str | Path, format: str = "onnx", towers: Sequence[str] | None = None,
           data: Any = None, dtype: str = "fp32", quantization: str = "dynamic", threshold: float | None = None,
           gate: bool = True, opset: int = OPSET) -> ExportResult:
    """Export a student (object or saved folder) to ``out``.

    Args:
        format: ``safetensors``, ``onnx``, ``onnx-fp16`` or ``onnx-int8``.
        towers: ``("image", "text")`` subset (default: every tower the student has).
        data: calibration / parity data (a path or Rows); generated stand-ins when None.
        dtype: safetensors weight dtype (``fp32``, ``fp16``, ``bf16``).
        quantization: ``dynamic`` or ``static`` (INT8; static calibrates the image tower on ``data``).
        threshold: minimum mean cosine to the PyTorch student (default per format, see THRESHOLDS).
        gate: raise :class:`ExportGateError` when under the threshold (the parity table is written anyway).

    Example:
        >>> export("runs/vit_tiny/student", "export/vit_tiny_int8", format="onnx-int8", data="val.csv")
    """
    from .students import load_student

    if format not in FORMATS:
        raise ValueError(f"format {format!r}: use one of {FORMATS}")
    if not hasattr(student, "encode_image"):
        student = load_student(student)
    have = [t for t in ("image", "text") if getattr(student, t) is not None]
    towers = list(towers or have)
    missing = [t for t in towers if t not in have]
    if missing:
        raise ValueError(f"--towers {','.join(towers)}: the student has no {' or '.join(missing)} tower (it has {have})")
    out = Path(out)
    if format == "safetensors":
        dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype {dtype!r}: use one of {list(dtypes)}")
        kept = copy.deepcopy(student)
        for t in set(have) - set(towers):
            setattr(kept, t, None)
        kept.save(out, dtype=dtypes[dtype])
        return ExportResult(out, format, {f.name: f.stat().st_size for f in out.rglob("*") if f.is_file()})

    out.mkdir(parents=True, exist_ok=True)
    images, texts, rows = calibration_inputs(student, data)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32 = _export_onnx(student, Path(tmp), towers, opset)
        cfg: dict[str, Any] = {"format": ONNX_FORMAT, "precision": format, "embed_dim": student.embed_dim,
                               "opset": opset, "teacher": student.teacher_identity}
        for tower, src in fp32.items():
            dst = out / src.name
            if format == "onnx":
                shutil.copyfile(src, dst)
            elif format == "onnx-fp16":
                _to_fp16(src, dst)
            else:
                cfg[f"{tower}_quantization"] = _to_int8(src, dst, tower, images, quantization == "static")
    if "image" in towers:
        cfg["image"] = {"file": "image.onnx", "preprocess": student.preprocess.to_dict()}
    if "text" in towers:
        cfg["text"] = _save_tokenizer(student, out)
    write_json(out / "onnx_config.json", cfg)

    threshold = THRESHOLDS[format] if threshold is None else threshold
    result = parity(student, out, images if "image" in towers else None, texts if "text" in towers else None, rows)
    write_json(out / "parity.json", {"format": format, "threshold": threshold, **result})
    atomic_write_text(out / "parity.md", _parity_table(format, threshold, result))
    files = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
    bad = {t: r["mean_cosine"] for t, r in result.items() if t in ("image", "text") and r["mean_cosine"] < threshold}
    if bad and gate:
        detail = ", ".join(f"{t} tower mean cosine {c:.4f}" for t, c in bad.items())
        raise ExportGateError(f"{out}: {format} export fails the accuracy gate: {detail} < {threshold} against the "
                              f"PyTorch student (table in {out / 'parity.md'}). Try onnx-fp16, static INT8 with "
                              f"--data, or --threshold if you accept the loss.")
    return ExportResult(out, format, files, result)


def pair_with_teacher_text(student, teacher):
    """An image-only student + the teacher's text tower as one two-tower Student (save() it; it
    loads with load_student / load_teacher for zero-shot). Supported teachers: folders saved by this
    library (tuned / LiT / demo teachers) and ``text:`` teachers; open_clip and HF CLIP teachers
    keep their own text code and are not supported."""
    from .students import Student, TextTower
    from .students.base import keep_space

    if student.image is None:
        raise ValueError("pairing needs an image student")
    if getattr(teacher, "backend", None) == "folder" and teacher.model.text is not None:
        text = copy.deepcopy(teacher.model.text)
    elif getattr(teacher, "backend", None) == "text":
        text = TextTower(copy.deepcopy(teacher.encoder), teacher._tokenizer, teacher.embed_dim,
                         {"arch": f"text:{teacher.name}", "pooling": teacher.pooling,
                          "context_length": teacher.context_length})
        keep_space(text.proj)  # the teacher's pooled output is its embedding
    else:
        raise ValueError(f"teacher backend {getattr(teacher, 'backend', '?')!r}: pairing supports this library's "
                         "saved teachers (folder) and text: teachers")
    if text.proj.out_features != student.embed_dim:
        raise ValueError(f"teacher text dim {text.proj.out_features} != student embed_dim {student.embed_dim}")
    pair = Student(copy.deepcopy(student.image), text, student.embed_dim)
    pair.teacher_identity = student.teacher_identity or teacher.identity
    return pair
