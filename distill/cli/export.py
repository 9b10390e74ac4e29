"""``distill export``: deployable exports of a student, each checked through its own runtime."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="deployable student export (safetensors, ONNX FP32/FP16/INT8, open_clip, "
                       "sentence-transformers, timm)",
                       description="Reads a student folder or a run folder (its student/) and writes weights only to "
                       "--out. safetensors: model.safetensors + config.json (+ tokenizer), loadable by load_student(). "
                       "onnx*: image.onnx / text.onnx (dynamic batch) + onnx_config.json + tokenizer, loadable by "
                       "distill.runtime.OnnxStudent without torch. open_clip: a local-dir: folder "
                       "(open_clip.create_model_and_transforms('local-dir:OUT'); needs both towers: pair an image "
                       "student with --pair-teacher). sentence-transformers: the text tower (SentenceTransformer(OUT)). "
                       "timm: the image tower, its classifier the projection (timm.create_model('local-dir:OUT', "
                       "pretrained=True), transformers AutoModelForImageClassification). Each export but safetensors "
                       "is loaded back by its own runtime and compared with the PyTorch student on --data (or "
                       "generated inputs); it fails (exit 3) under the gate on the mean and the 1st-percentile cosine "
                       "(0.999/0.995 FP32, 0.99/0.98 FP16, 0.97/0.90 INT8, 0.9999/0.9995 open_clip, "
                       "sentence-transformers, timm); parity.md/json land in --out.")
    e.add_argument("path", help="student folder or run folder")
    e.add_argument("--out", required=True)
    e.add_argument("--format", default="safetensors", choices=["safetensors", "onnx", "onnx-fp16", "onnx-int8",
                                                                "open_clip", "sentence-transformers", "timm"])
    e.add_argument("--towers", default=None, help="image,text (default: every tower the student has; safetensors/onnx)")
    e.add_argument("--data", default=None, help="parity/calibration data (csv, jsonl, folder...)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="safetensors weight dtype")
    e.add_argument("--quantization", default="dynamic", choices=["dynamic", "static"],
                   help="INT8: dynamic, or static calibrated on images (image tower): --calibration-data, or --data "
                   "images other than the ones verified")
    e.add_argument("--calibration-data", default=None,
                   help="static INT8: the images to calibrate on (e.g. training photos), so --data can be held out")
    e.add_argument("--threshold", type=float, default=None, help="minimum mean cosine (default per format)")
    e.add_argument("--low-threshold", type=float, default=None,
                   help="minimum 1st-percentile cosine (default per format)")
    e.add_argument("--no-gate", action="store_true", help="write the parity table but never fail")
    e.add_argument("--pair-teacher", default=None,
                   help="add this teacher's text tower to an image student (saved/LiT, text: or openclip: teachers)")
    e.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file for --pair-teacher")
    e.add_argument("--overwrite", action="store_true",
                   help="replace another clip-distill artifact at --out (never the student's own folder)")
    e.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    from ..export import ExportGateError, export
    from ..interop.pair import pair_with_teacher_text
    from ..interop import load_student
    from ..outputs import model_folder

    src = Path(args.path)
    src = model_folder(src)
    student = load_student(src)
    if args.pair_teacher:
        from ..teachers import load_teacher

        student = pair_with_teacher_text(student, load_teacher(args.pair_teacher, pretrained=args.pretrained))
    towers = args.towers.split(",") if args.towers else None
    try:
        result = export(student, args.out, args.format, towers, data=args.data, dtype=args.dtype,
                        quantization=args.quantization, threshold=args.threshold, gate=not args.no_gate,
                        low_threshold=args.low_threshold, overwrite=args.overwrite, calibration=args.calibration_data,
                        inputs={"the student being exported": src, "the paired teacher": args.pair_teacher,
                                "the paired teacher's weights": args.pretrained})
    except ExportGateError as e:
        print(f"distill export: gate failed: {e}", file=sys.stderr)
        return 3
    size = sum(result.files.values())
    print(f"exported {student.modality} student ({student.num_params() / 1e6:.2f}M params) as {args.format} "
          f"to {result.path} ({size / 1e6:.1f} MB)")
    for name, r in result.parity.items():
        if isinstance(r, dict) and "p1_cosine" in r:
            print(f"  {name}: mean cosine to PyTorch {r['mean_cosine']:.5f} (1st percentile {r['p1_cosine']:.5f}, "
                  f"min {r['min_cosine']:.5f}, max abs err {r['max_abs_err']:.1e}, n={r['n']})")
    return 0
