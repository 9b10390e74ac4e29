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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._imports import require
from .errors import ExportError, ExportGateError  # noqa: F401  (importable from here too)
from .io import atomic_write_text, write_json
from .runtime import ONNX_FORMAT, OnnxStudent

log = logging.getLogger(__name__)

INTEROP = ("open_clip", "sentence-transformers", "timm")
FORMATS = ("safetensors", "onnx", "onnx-fp16", "onnx-int8", *INTEROP)
# format: (minimum mean cosine, minimum 1st-percentile cosine) to the PyTorch student, per tower. The
# percentile gate catches a few broken samples the mean hides: INT8 spreads wider per sample than it
# moves the mean; the library formats hold the same weights in float32, so both gates are near 1.
GATES = {"onnx": (0.999, 0.995), "onnx-fp16": (0.99, 0.98), "onnx-int8": (0.97, 0.90),
         **{fmt: (0.9999, 0.9995) for fmt in INTEROP}}
THRESHOLDS = {fmt: gate[0] for fmt, gate in GATES.items()}  # mean-cosine gates (kept for callers)
OPSET = 17  # ai.onnx 17: LayerNormalization as one op; every onnxruntime >= 1.14 runs it
CALIBRATION_TEXTS = (
    "a photo of a dog", "a red car parked on the street", "two children playing football on the beach",
    "a bowl of fruit on a wooden table", "an aerial view of a city at night", "a black and white cat",
    "a man riding a bicycle", "a plate of pasta", "snow-covered mountains under a blue sky",
    "a close-up of a flower", "people waiting at a train station", "a small boat on a lake",
)


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
            raise ExportError("static INT8 needs calibration images (--data)")
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
            raise ExportError("the text tower's tokenizer has no fast (tokenizer.json) form; the ONNX runtime needs one")
        shutil.copytree(tmp, out / "tokenizer", dirs_exist_ok=True)  # for transformers users
    tok = student.text.tokenizer
    return {"file": "text.onnx", "tokenizer": "tokenizer/tokenizer.json", "context_length": student.text.context_length,
            "pad_id": int(tok.pad_token_id or 0), "pad_token": tok.pad_token or "[PAD]"}


# -- parity inputs ---------------------------------------------------------------------------------
def _sample(rows: Any, limit: int, seed: int, skip: int = 0) -> Any:
    """``limit`` rows with distinct images (rows sharing an image count once), taken from a seeded
    permutation after its first ``skip``: two calls with different ``skip`` share no image."""
    first: dict[Any, int] = {}
    for i, key in enumerate(rows.images if rows.has_images else [None] * len(rows)):
        first.setdefault(key if key else ("row", i), i)
    index = np.fromiter(first.values(), dtype=np.int64)
    pick = index[np.random.default_rng(seed).permutation(len(index))[skip:skip + limit]]
    return rows.subset(sorted(pick.tolist()))


def _stand_in_images(size: int, seed: int, n: int = 16) -> list:
    """Smooth random images (closer to photos than white noise), 3:2 and larger than the student's
    input, so resizing and cropping are exercised too."""
    from PIL import Image

    low = np.random.default_rng(seed).uniform(0, 255, (n, 8, 12, 3)).astype(np.uint8)
    return [Image.fromarray(a).resize((size * 3, size * 2), Image.BICUBIC) for a in low]


def parity_images(student: Any, rows: Any = None, seed: int = 0, stand_ins: int = 16) -> list:
    """PIL images to check an image tower on: the rows' images, or ``stand_ins`` generated ones."""
    from .data import open_image
    from .transforms import to_rgb

    if rows is not None and rows.has_images:
        return [to_rgb(open_image(p)) for p in rows.images if p]
    return _stand_in_images(student.preprocess.image_size, seed, stand_ins)


def calibration_inputs(student, data: Any = None, limit: int = 64, seed: int = 0, skip: int = 0,
                       stand_ins: int = 16):
    """(images: [N, 3, S, S] float32 pixels or None, texts: list[str] or None, rows or None) from
    ``limit`` distinct images of the user's data (after ``skip`` of the same seeded permutation), or
    ``stand_ins`` generated images and built-in captions when no data is given."""
    from .data import as_rows
    from .transforms import eval_array

    rows = _sample(as_rows(data), limit, seed, skip) if data is not None else None
    images = texts = None
    if student.image is not None:
        pil = parity_images(student, rows, seed, stand_ins)
        images = np.stack([eval_array(im, student.preprocess) for im in pil])
    if student.text is not None:
        texts = [c for c in rows.captions if c] if rows is not None and rows.has_text else list(CALIBRATION_TEXTS)
    return images, texts, rows


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def agreement(ref: Any, got: Any) -> dict[str, Any]:
    """Per-sample cosine (mean, 1st percentile, min) and max abs error of two [N, D] embedding sets."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    c = _cos(ref, got)
    return {"n": len(c), "mean_cosine": float(c.mean()), "p1_cosine": float(np.percentile(c, 1)),
            "min_cosine": float(c.min()), "max_abs_err": float(np.abs(ref - got).max())}


@torch.no_grad()
def parity(student, folder: str | Path, images: np.ndarray | None, texts: Sequence[str] | None,
           rows: Any = None) -> dict[str, Any]:
    """Compare an ONNX export with the PyTorch student on the same inputs: per-tower cosine
    statistics (:func:`agreement`) of the normalised embeddings; zero-shot top-1 delta when ``rows``
    has labels and the export has both towers."""
    onnx_model = OnnxStudent(folder)
    student = student.cpu().float().eval()
    out: dict[str, Any] = {}
    emb = {}
    if images is not None and onnx_model._image is not None:
        ref = student.encode_image(torch.from_numpy(images)).numpy()
        got = onnx_model.encode_image(images)
        out["image"] = agreement(ref, got)
        emb["image"] = (ref, got)
    if texts is not None and onnx_model._text is not None:
        out["text"] = agreement(student.encode_text(list(texts)).numpy(), onnx_model.encode_text(list(texts)))
    if rows is not None and getattr(rows, "labels", None) and "image" in emb and onnx_model._text is not None:
        prompts = [f"a photo of a {c}." for c in rows.classes]
        labels = np.array([rows.labels[i] for i, p in enumerate(rows.images) if p])
        ref_cls, got_cls = student.encode_text(prompts).numpy(), onnx_model.encode_text(prompts)
        acc_ref = float(((emb["image"][0] @ ref_cls.T).argmax(-1) == labels).mean())
        acc_got = float(((emb["image"][1] @ got_cls.T).argmax(-1) == labels).mean())
        out["zero_shot_top1"] = {"pytorch": acc_ref, "onnx": acc_got, "delta": acc_got - acc_ref}
    return out


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
        lines += ["", f"preprocess config ({', '.join(p['keys'])}) matches the student's: {p['config_match']}; "
                  f"with each side's own preprocessing of {p['n']} images: mean cosine {p['mean_cosine']:.6f}, "
                  f"max pixel difference {p['max_pixel_diff']:.3g} (reported, not gated: resize-then-crop vs "
                  "crop-then-resize round differently on non-square images)"]
    if "calibration" in result:
        c = result["calibration"]
        lines += ["", f"static INT8 calibrated on {c['images']} images, none of them among the {c['parity_images']} "
                  "verified here"]
    return "\n".join(lines) + "\n"


def _checked(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The gated entries of a parity result: those with cosine statistics."""
    return {k: v for k, v in result.items() if isinstance(v, dict) and "p1_cosine" in v}


def gate_failures(result: dict[str, Any], gate: tuple[float, float]) -> list[str]:
    """What fails the gate, one phrase per failing statistic."""
    bad = []
    for name, r in _checked(result).items():
        name = name.replace("image", "image tower", 1) if name.startswith("image") else f"{name} tower"
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
           overwrite: bool = False, inputs: dict[str, Any] | None = None) -> ExportResult:
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

    ``out`` is written whole: the export is built in a staging folder beside it and takes its place when
    complete. An export that fails its gate is left at ``out`` only when nothing was there before.

    Example:
        >>> export("runs/vit_tiny/student", "export/vit_tiny_int8", format="onnx-int8", data="val.csv")
        >>> export(paired, "export/oc", format="open_clip")  # open_clip.create_model_and_transforms("local-dir:export/oc")
    """
    from .outputs import claim, staged
    from .students import load_student

    if format not in FORMATS:
        raise ExportError(f"format {format!r}: use one of {FORMATS}")
    source = None
    if not hasattr(student, "encode_image"):
        source = student
        student = load_student(student)
    inputs = {"the student being exported": source, "the parity data": data if isinstance(data, (str, Path)) else None,
              **(inputs or {})}
    student = copy.deepcopy(student).cpu().float().eval() if format != "safetensors" else student
    have = [t for t in ("image", "text") if getattr(student, t) is not None]
    if towers and format in INTEROP:
        raise ExportError(f"--towers applies to safetensors and ONNX; the {format} format takes the towers it holds")
    towers = list(towers or have)
    missing = [t for t in towers if t not in have]
    if missing:
        raise ExportError(f"--towers {','.join(towers)}: the student has no {' or '.join(missing)} tower (it has {have})")
    out = Path(out)
    held = claim(out, f"a {format} export", inputs, overwrite=overwrite)
    if format == "safetensors":
        dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise ExportError(f"dtype {dtype!r}: use one of {list(dtypes)}")
        kept = copy.deepcopy(student)
        for t in set(have) - set(towers):
            setattr(kept, t, None)
        with staged(out) as tmp:
            kept.write(tmp, dtype=dtypes[dtype])
        return ExportResult(out, format, _files(out))

    limits = GATES[format]
    limits = (limits[0] if threshold is None else threshold, limits[1] if low_threshold is None else low_threshold)
    with staged(out) as tmp:
        result = _write_checked(student, tmp, format, towers, data, quantization, opset)
        write_json(tmp / "parity.json", {"format": format, "threshold": limits[0], "low_threshold": limits[1],
                                         "low_statistic": "1st-percentile cosine", **result})
        atomic_write_text(tmp / "parity.md", _parity_table(format, limits, result))
        if format == "open_clip":
            from .interop.open_clip import relocate

            relocate(tmp, out)  # the paths open_clip reads point where the folder is about to be
        bad = gate_failures(result, limits) if gate else []
        if bad and held is not None:  # a failed export never replaces one that was there
            raise _gate_error(out, format, bad, f"{out} still holds the previous export")
    if bad:
        raise _gate_error(out, format, bad, f"table in {out / 'parity.md'}")
    return ExportResult(out, format, _files(out), result)


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


def _write_checked(student: Any, folder: Path, format: str, towers: Sequence[str], data: Any, quantization: str,
                   opset: int) -> dict[str, Any]:
    """Write ``format`` into ``folder`` and compare it, loaded by its own runtime, with the student."""
    if format in INTEROP:  # float32 copies of the same weights: any layout error shows on every sample
        images, texts, rows = calibration_inputs(student, data, stand_ins=8)
        return _export_interop(format, student, folder, images, texts, rows)
    static = format == "onnx-int8" and quantization == "static" and "image" in towers
    images, texts, rows, calibration = _onnx_inputs(student, data, static)
    _write_onnx(student, folder, format, towers, calibration, static, opset)
    result = parity(student, folder, images if "image" in towers else None, texts if "text" in towers else None, rows)
    if static:
        result["calibration"] = {"images": len(calibration), "parity_images": len(images), "disjoint": True}
    return result


def _gate_error(out: Path, format: str, bad: list[str], where: str) -> ExportGateError:
    return ExportGateError(f"{out}: {format} export fails the accuracy gate: {'; '.join(bad)} against the PyTorch "
                           f"student ({where}). {_GATE_HINTS.get(format, '')}")


_GATE_HINTS = {fmt: "Try onnx-fp16, static INT8 with --data, or --threshold / --low-threshold if you accept the loss."
               for fmt in ("onnx", "onnx-fp16", "onnx-int8")}


def _onnx_inputs(student: Any, data: Any, static: bool):
    """Parity inputs and, for static INT8, calibration images from other images of ``data``."""
    if not static:
        return (*calibration_inputs(student, data), None)
    from .data import as_rows

    n = len(_sample(as_rows(data), len(as_rows(data)), 0)) if data is not None else 0  # distinct images
    if n < 2:
        raise ExportError("static INT8 needs --data with at least 2 images: it calibrates on some and verifies on others")
    images, texts, rows = calibration_inputs(student, data, limit=min(64, n // 2))
    calibration = calibration_inputs(student, data, limit=64, skip=min(64, n // 2))[0]
    return images, texts, rows, calibration


def _write_onnx(student: Any, out: Path, format: str, towers: Sequence[str], calibration: np.ndarray | None,
                static: bool, opset: int) -> None:
    if "text" in towers and not hasattr(student.text.tokenizer, "pad_token_id"):
        raise ExportError(f"text tower {student.text.spec.get('arch')!r} tokenizes with open_clip's own tokenizer, "
                          "which has no tokenizer.json for the ONNX runtime: export --towers image, or --format open_clip")
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
                cfg[f"{tower}_quantization"] = _to_int8(src, dst, tower, calibration, static)
    if "image" in towers:
        cfg["image"] = {"file": "image.onnx", "preprocess": student.preprocess.to_dict()}
    if "text" in towers:
        cfg["text"] = _save_tokenizer(student, out)
    write_json(out / "onnx_config.json", cfg)


@torch.no_grad()
def _export_interop(format: str, student: Any, out: Path, images: np.ndarray | None, texts: Sequence[str] | None,
                    rows: Any) -> dict[str, Any]:
    """Write ``format``'s own layout, load it back with that library alone and compare it with the student."""
    from .interop import open_clip as oc
    from .interop import sentence_transformers as st
    from .interop import timm as tm

    result: dict[str, Any] = {}
    if format == "sentence-transformers":
        st.export_sentence_transformers(student, out)
        result["text"] = agreement(student.encode_text(list(texts)).numpy(), st.sentence_transformers_parity(out, texts))
    elif format == "timm":
        tm.export_timm(student, out)
        for runtime, (ref, got) in tm.timm_parity(student, out, torch.from_numpy(images)).items():
            result["image" if runtime == "timm" else f"image ({runtime})"] = agreement(ref.numpy(), got.numpy())
    else:
        oc.export_open_clip(student, out)
        got = oc.open_clip_parity(out, torch.from_numpy(images), texts)
        result["image"] = agreement(student.encode_image(torch.from_numpy(images)).numpy(), got["image"].numpy())
        result["text"] = agreement(student.encode_text(list(texts)).numpy(), got["text"].numpy())
        result["preprocess"] = oc.preprocess_check(student, got, parity_images(student, rows, stand_ins=8))
    return result


from .students.pair import pair_with_teacher_text  # noqa: E402,F401  (kept importable from here)
