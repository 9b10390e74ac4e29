"""ONNX exports (FP32, FP16, INT8) of a student, run by ``distill.runtime.OnnxStudent`` with onnxruntime alone.

``image.onnx`` / ``text.onnx`` have a dynamic batch (and sequence) axis at opset 17; INT8 is onnxruntime's
dynamic quantisation, or static QDQ calibrated on images of the user's data other than those the parity
check verifies. ``onnx_config.json`` holds the preprocessing and the tokenizer settings the runtime needs.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .._imports import require
from ..errors import ExportError
from ..io import portable_teacher, write_json
from ..runtime import ONNX_FORMAT, OnnxStudent
from .parity import agreement, calibration_inputs, sample_rows
from .registry import Format, register_format

OPSET = 17  # ai.onnx 17: LayerNormalization as one op; every onnxruntime >= 1.14 runs it
# (minimum mean cosine, minimum 1st-percentile cosine) to the PyTorch student, per tower: INT8 spreads
# wider per sample than it moves the mean, so the percentile gate catches a few broken samples
GATES = {"onnx": (0.999, 0.995), "onnx-fp16": (0.99, 0.98), "onnx-int8": (0.97, 0.90)}
HINT = "Try onnx-fp16, static INT8 with --data, or --threshold / --low-threshold if you accept the loss."


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


LEVELS = ("", "the first and last layers", "the last quarter of the layers", "the last half of the layers")


def float_layers(model: Any, level: int = 0) -> tuple[list[str], int]:
    """(names, count) of the weighted layers INT8 leaves in float at ``level``, and how many weighted layers
    there are. 0: every depthwise convolution (one 3x3 filter per channel: ranges too wide for 8 bits, and a
    tiny share of the weights); 1: also the first (it reads the raw input) and the last (the projection into
    the teacher's space); 2, 3: also the last quarter, the last half of the layers."""
    inits = {i.name: i for i in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1
                and n.input[1] in inits]
    keep = set()
    for n in weighted:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and inits[n.input[1]].dims[1] == 1:
            keep.add(n.name)
    if level >= 1 and weighted:
        keep |= {weighted[0].name, weighted[-1].name}
    if level >= 2:
        keep |= {n.name for n in weighted[int(len(weighted) * (1 - 0.25 * (level - 1))):]}
    return sorted(keep), len(weighted)


def _run(path: Path, tower: str, inputs: Any) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if tower == "image":
        return np.concatenate([session.run(None, {"pixels": inputs[i:i + 32]})[0] for i in range(0, len(inputs), 32)])
    return session.run(None, inputs)[0]


def _to_int8(src: Path, dst: Path, tower: str, calibration: np.ndarray | None, static: bool,
             check: Any = None) -> str:
    """Quantise ``src`` into ``dst``. Weights per output channel (``MatMul``/``Gemm``/``Conv`` and, for text, the
    token embeddings); activation-by-activation products (attention), norms and softmax stay float;
    depthwise convolutions stay float. Dynamic: activations quantised per call; static: QDQ with activation
    ranges from ``calibration``. While the result misses the INT8 gate on ``check`` inputs (not those the gate
    verifies), more layers stay float (``float_layers``: the first and last, then the last quarter, then half).
    Returns what was done, in words."""
    onnx = require("onnx", "INT8 export")
    require("onnxruntime", "INT8 export")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # folds constants (BatchNorm into Conv) so every weight is an initializer, and infers shapes
    pre = src.with_name(f"{src.stem}.pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    if static and (calibration is None or not len(calibration)):
        raise ExportError("static INT8 needs calibration images (--data or --calibration-data)")
    model = onnx.load(str(pre))
    reference = _run(src, tower, check) if check is not None else None
    for level in range(len(LEVELS)):
        keep, total = float_layers(model, level)
        options = {"nodes_to_exclude": keep, "extra_options": {"MatMulConstBOnly": True}}
        if static:  # min-max activation ranges (onnxruntime's percentile calibrator fails on some graphs)
            options["extra_options"]["WeightSymmetric"] = True
            q.quantize_static(str(pre), str(dst), _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                              op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                              weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8, **options)
        else:  # ConvInteger takes uint8 weights only; MatMulInteger and Gather take int8
            ops = ["MatMul", "Gemm", "Gather"] if tower == "text" else ["MatMul", "Gemm", "Conv"]
            q.quantize_dynamic(str(pre), str(dst), op_types_to_quantize=ops, per_channel=True,
                               weight_type=q.QuantType.QUInt8 if tower == "image" else q.QuantType.QInt8, **options)
        if reference is None:
            break
        fit = agreement(reference, _run(dst, tower, check))
        if fit["mean_cosine"] >= GATES["onnx-int8"][0] and fit["p1_cosine"] >= GATES["onnx-int8"][1]:
            break
    how = "static (QDQ, per-channel weights, calibrated activations)" if static else "dynamic (per-channel weights)"
    depthwise = len(float_layers(model, 0)[0])
    why = [f"{depthwise} depthwise convolutions"] * bool(depthwise) + [LEVELS[level]] * bool(level)
    kept = f"{len(keep)} of {total} weighted layers kept in float ({', '.join(why)})" if keep else \
        f"all {total} weighted layers in INT8"
    return f"{how}; {kept}"


def _save_tokenizer(student, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        student.text.tokenizer.save_pretrained(tmp)
        if not (Path(tmp) / "tokenizer.json").exists():
            raise ExportError("the text tower's tokenizer has no fast (tokenizer.json) form; the ONNX runtime needs one")
        shutil.copytree(tmp, out / "tokenizer", dirs_exist_ok=True)  # for transformers users
    tok = student.text.tokenizer
    return {"file": "text.onnx", "tokenizer": "tokenizer/tokenizer.json", "context_length": student.text.context_length,
            "pad_id": int(tok.pad_token_id or 0), "pad_token": tok.pad_token or "[PAD]"}


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


def _onnx_inputs(student: Any, data: Any, static: bool, calibration: Any = None):
    """Parity inputs and, for static INT8, calibration images: from ``calibration`` when given, else from
    other images of ``data`` than the ones the parity check verifies."""
    if not static:
        return (*calibration_inputs(student, data), None)
    if calibration is not None:
        return (*calibration_inputs(student, data), calibration_inputs(student, calibration, limit=64)[0])
    from ..data import as_rows

    n = len(sample_rows(as_rows(data), len(as_rows(data)), 0)) if data is not None else 0  # distinct images
    if n < 2:
        raise ExportError("static INT8 needs --data with at least 2 images: it calibrates on some and verifies on others")
    images, texts, rows = calibration_inputs(student, data, limit=min(64, n // 2))
    calibration = calibration_inputs(student, data, limit=64, skip=min(64, n // 2))[0]
    return images, texts, rows, calibration


def _tuning_inputs(student: Any, data: Any, parity_rows: Any, calibration: np.ndarray | None) -> dict[str, Any]:
    """What INT8 checks itself on while choosing the layers it leaves in float, per tower: images and captions
    of ``data`` the parity check does not verify (the calibration images for static INT8), else generated
    stand-ins of another seed than the parity check's."""
    from ..data import as_rows

    skip = len(parity_rows) if parity_rows is not None else 0
    rows = as_rows(data) if data is not None else None
    distinct = len(sample_rows(rows, len(rows), 0)) if rows is not None else 0
    images, texts, _ = (calibration_inputs(student, data, limit=32, skip=skip) if distinct > skip
                        else calibration_inputs(student, None, seed=1))
    out: dict[str, Any] = {}
    if student.image is not None:
        out["image"] = calibration if calibration is not None and len(calibration) else images
    if student.text is not None and texts:
        tok = student.tokenize(list(texts))
        out["text"] = {"input_ids": tok["input_ids"].numpy(), "attention_mask": tok["attention_mask"].numpy()}
    return out


def _write_onnx(student: Any, out: Path, format: str, towers: Sequence[str], calibration: np.ndarray | None,
                static: bool, opset: int, tuning: dict[str, Any] | None = None) -> None:
    if "text" in towers and not hasattr(student.text.tokenizer, "pad_token_id"):
        raise ExportError(f"text tower {student.text.spec.get('arch')!r} tokenizes with open_clip's own tokenizer, "
                          "which has no tokenizer.json for the ONNX runtime: export --towers image, or --format open_clip")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32 = _export_onnx(student, Path(tmp), towers, opset)
        cfg: dict[str, Any] = {"format": ONNX_FORMAT, "precision": format, "embed_dim": student.embed_dim,
                               "opset": opset, "teacher": portable_teacher(student.teacher_identity, out),
                               # the PyTorch towers it was made from: an INT8 copy matches an index its FP32 built
                               "weights_ids": {t: student.weights_id(t) for t in towers}}
        for tower, src in fp32.items():
            dst = out / src.name
            if format == "onnx":
                shutil.copyfile(src, dst)
            elif format == "onnx-fp16":
                _to_fp16(src, dst)
            else:
                cfg[f"{tower}_quantization"] = _to_int8(src, dst, tower, calibration, static and tower == "image",
                                                        (tuning or {}).get(tower))
    if "image" in towers:
        cfg["image"] = {"file": "image.onnx", "preprocess": student.preprocess.to_dict()}
    if "text" in towers:
        cfg["text"] = _save_tokenizer(student, out)
    write_json(out / "onnx_config.json", cfg)


def write(student: Any, folder: Path, format: str = "onnx", data: Any = None, towers: Sequence[str] = ("image", "text"),
          quantization: str = "dynamic", opset: int = OPSET, calibration: Any = None, **_: Any) -> dict[str, Any]:
    """Write ``format`` (onnx, onnx-fp16, onnx-int8) into ``folder`` and compare it with the student on
    ``data``; static INT8 calibrates on ``calibration`` (default: other images of ``data``)."""
    static = format == "onnx-int8" and quantization == "static" and "image" in towers
    own = calibration is not None
    images, texts, rows, calibration = _onnx_inputs(student, data, static, calibration)
    tuning = _tuning_inputs(student, data, rows, calibration) if format == "onnx-int8" else None
    _write_onnx(student, folder, format, towers, calibration, static, opset, tuning)
    result = parity(student, folder, images if "image" in towers else None, texts if "text" in towers else None, rows)
    if static:
        result["calibration"] = {"images": len(calibration), "parity_images": len(images),
                                 **({"source": "calibration data"} if own else {"disjoint": True})}
    return result


for _name, _gate in GATES.items():
    register_format(Format(_name, lambda student, folder, _fmt=_name, **kw: write(student, folder, _fmt, **kw),
                           gate=_gate, towers=True, hint=HINT,
                           usage='from distill.runtime import OnnxStudent  # onnxruntime, no torch\nmodel = OnnxStudent("{path}")'))
