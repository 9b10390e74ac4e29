"""Adapters that make a frozen tower a language model's eyes, on a tiny random Llama and a tiny tower."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_student
from distill.errors import DataError, ModelError, RecipeError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou describe photos.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

FAST = dict(batch_size=16, num_workers=0, progress=False, warmup_steps=2, lr=1e-2, prefix_tokens=4,
            projector_hidden=64, max_answer_tokens=16)


def _tokenizer(texts, template=CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    if template:
        fast.chat_template = template
    return fast


def write_tiny_lm(folder, texts, template=CHATML, tokenizer=True):
    """A tiny random Llama (2 layers, width 32) and a byte-level BPE tokenizer with a ChatML template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(texts, template)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(shapes, tmp_path_factory):
    """(LM folder, tower folder, a student of that tower's folder, another tower's folder, train csv)."""
    from distill.data import load_rows
    from distill.teachers.base import file_hash

    root = tmp_path_factory.mktemp("vlm")
    rows = load_rows(str(shapes / "train.csv"))
    lm = write_tiny_lm(root / "lm", [c for c in rows.captions if c] + [CHATML])
    torch.manual_seed(1)
    tiny_student().save(root / "tower")
    student = tiny_student()
    student.teacher_identity = {"backend": "folder", "name": "tower",
                                "weights": file_hash(root / "tower" / "model.safetensors"), "embed_dim": 32}
    student.save(root / "student")
    torch.manual_seed(2)
    tiny_student(embed_dim=48).save(root / "wide")
    return {"lm": str(lm), "tower": str(root / "tower"), "student": str(root / "student"),
            "wide": str(root / "wide"), "train": str(shapes / "train.csv"), "test": str(shapes / "test.csv")}


def _fit(parts, out, steps, **kw):
    from distill.vlm import AdapterTrainer

    return AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(out), max_steps=steps,
                          **{**FAST, **kw}).fit(parts["train"])


def test_the_answer_tokens_carry_the_loss_and_it_falls(parts, tmp_path):
    result = _fit(parts, tmp_path / "run", 150)
    loss = result.history["loss"]
    # a random 2-layer LM read through 4 prefix tokens: ~7.2 -> ~6.1
    assert sum(loss[-5:]) / 5 < 0.9 * sum(loss[:5]) / 5
    vlm = result.model
    feats = torch.randn(3, 32)
    ids, mask = vlm.chat.answer_ids(vlm.tokenizer, ["a red circle", "a blue square on the left", "x"], 16)
    prompt_len = vlm.prompt_embeds(feats).shape[1]
    labels = vlm.labels(prompt_len, ids, mask)
    # the chat prompt and the image tokens: no loss; the answer and its end of turn: the loss; padding: none
    assert prompt_len == len(vlm.chat.before) + 4 + len(vlm.chat.after)
    assert (labels[:, :prompt_len] == -100).all()
    assert torch.equal(labels[:, prompt_len:][mask == 1], ids[mask == 1])
    assert (labels[:, prompt_len:][mask == 0] == -100).all()
    end = vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [int(r[m == 1][-1]) for r, m in zip(ids, mask)] == [end] * 3
    # the prompt's opening run once and reused: the same loss as the whole sequence every step
    answers = ["a red circle", "a blue square on the left", "x"]
    with torch.no_grad():
        reused, n = vlm.loss(feats, answers)
        whole, n2 = vlm.loss(feats, answers, reuse_prefix=False)
    assert vlm._can_reuse_prefix() and n == n2 == int(mask.sum())
    assert torch.allclose(reused, whole, atol=1e-5), (reused, whole)
    # in a training step the frozen LM stays in eval mode (no dropout), the projector trains
    from distill.features import FrozenTable
    from distill.vlm import AdapterStep

    step = AdapterStep(vlm, FrozenTable({0: 0}, torch.randn(1, 32))).train()
    loss, terms = step({"index": torch.tensor([0]), "captions": ["a red circle"]})
    assert not vlm.lm.training and vlm.projector.training and terms["answer_tokens"] > 0
    # only the projector trained: the LM's weights are the ones in its folder
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(parts["lm"])
    for (k, a), b in zip(fresh.state_dict().items(), vlm.lm.state_dict().values()):
        assert torch.equal(a, b), k
    assert not (result.output_dir / "checkpoints").exists() or all(
        "lm." not in k for k in json.loads((result.output_dir / "run.json").read_text())["run"])


def test_saved_adapter_generates_the_same_captions_and_swaps_to_a_student(parts, tmp_path):
    from distill.vlm import caption_images, load_vlm

    result = _fit(parts, tmp_path / "run", 20)
    photos = str(parts["test"])
    before = caption_images(result.model, photos, tower=parts["tower"], max_new_tokens=8, progress=False)
    again = load_vlm(result.model_dir)
    after = caption_images(again, photos, max_new_tokens=8, progress=False)  # the tower its config names
    assert len(before.captions) == 40 and before.captions == after.captions
    assert (result.model_dir / "README.md").read_text().startswith("# Adapter: tower ->")
    cfg = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert not any(str(v).startswith("/") for v in (cfg["vision"]["path"], cfg["lm"]["lm"]))
    # a student of the tower's teacher lives in its space: the adapter reads it without retraining
    swapped = caption_images(again, photos, tower=parts["student"], max_new_tokens=8, progress=False)
    assert len(swapped.captions) == 40 and all(isinstance(c, str) for c in swapped.captions)
    assert swapped.captions != before.captions  # other features, other words
    with pytest.raises(ModelError, match="vision.width"):
        caption_images(again, photos, tower=parts["wide"], progress=False)
    # sampled captions follow the seed
    a = caption_images(again, photos, sample=True, seed=3, max_new_tokens=6, progress=False).captions
    b = caption_images(again, photos, sample=True, seed=3, max_new_tokens=6, progress=False).captions
    assert a == b


def test_a_tower_of_another_space_and_another_lm_are_refused(parts, tmp_path):
    from distill.vlm import caption_images, load_vlm

    result = _fit(parts, tmp_path / "run", 2)
    torch.manual_seed(5)
    tiny_student().save(tmp_path / "stranger")
    with pytest.raises(ModelError, match=r"vision.space: .*'stranger'"):
        caption_images(load_vlm(result.model_dir), parts["test"], tower=str(tmp_path / "stranger"), progress=False)
    from distill.data import load_rows

    other = write_tiny_lm(tmp_path / "other_lm", ["a b c d", "e f g"])
    with pytest.raises(ModelError, match=r"lm\.(vocab_size|weights)"):
        load_vlm(result.model_dir, lm_name=str(other))
    assert load_rows(parts["train"]).captions  # (the data is untouched)


def test_resume_after_a_kill_equals_an_uninterrupted_run(parts, tmp_path):
    # with noise on the features: the random state the steps draw from is restored too
    kw = dict(checkpoint_every=3, grad_accum=2, feature_noise=0.05)
    full = _fit(parts, tmp_path / "full", 6, **kw)
    _fit(parts, tmp_path / "cut", 3, **kw)  # "killed" after the step-3 checkpoint
    resumed = _fit(parts, tmp_path / "cut", 6, resume=True, **kw)
    quiet = _fit(parts, tmp_path / "quiet", 6, checkpoint_every=3, grad_accum=2)
    assert quiet.history["loss"][1:] != full.history["loss"][1:]  # the noise is there
    assert resumed.history["loss"] == full.history["loss"]
    for (k, a), b in zip(full.model.projector.state_dict().items(), resumed.model.projector.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1] / "model.safetensors"
    assert ckpt.stat().st_size < 200_000  # the adapter only: the frozen LM is not in the checkpoint


def test_unreadable_photos_are_skipped_and_listed(parts, tmp_path):
    import csv

    from distill.vlm import caption_images, load_vlm

    from pathlib import Path

    with open(parts["train"]) as f:
        rows = [{**r, "image": str(Path(parts["train"]).parent / r["image"])} for r in csv.DictReader(f)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:40] + [{**rows[0], "image": str(bad)}])
    from distill.vlm import AdapterTrainer

    result = AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "run"), max_steps=3,
                            **FAST).fit(str(data))
    skipped = [json.loads(line) for line in (result.output_dir / "skipped.jsonl").read_text().splitlines()]
    assert [s["image"].endswith("broken.jpg") for s in skipped] == [True]
    out = caption_images(load_vlm(result.model_dir), [str(bad), rows[1]["image"]], max_new_tokens=4,
                         progress=False)
    assert list(out.skipped) == [str(bad)] and len(out.captions) == 1
    # nothing readable at all: one line, not a run that spins
    only_bad = tmp_path / "bad.csv"
    only_bad.write_text(f"image,caption\n{bad},a photo\n{tmp_path / 'gone.jpg'},another\n")
    with pytest.raises(DataError, match="no photo .*could be read.*broken.jpg"):
        AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "run2"), max_steps=3,
                       **FAST).fit(str(only_bad))


def test_patch_tokens_merge_into_fewer_tokens(parts, tmp_path):
    from distill.vlm import pixel_shuffle

    x = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)
    merged = pixel_shuffle(x, 2)
    assert merged.shape == (2, 4, 12)
    # the first merged token holds the top-left 2 x 2 square of the 4 x 4 grid
    assert torch.equal(merged[0, 0].view(4, 3), x[0, [0, 1, 4, 5]])
    result = _fit(parts, tmp_path / "run", 4, features="patches", merge=2)
    vlm = result.model
    assert vlm.vision["features"] == "patches" and vlm.projector.spec()["merge"] == 2
    feats = torch.randn(1, 16, vlm.vision["width"])  # a 32 px tower with 8 px patches: a 4 x 4 grid
    assert vlm.projector(feats).shape == (1, 4, 32)  # 4 tokens of the LM's width


def test_bad_language_models_are_named(parts, tmp_path):
    from distill.vlm import load_lm

    no_tok = write_tiny_lm(tmp_path / "no_tok", ["a b"], tokenizer=False)
    with pytest.raises(ModelError, match="has no tokenizer"):
        load_lm(str(no_tok))
    no_template = write_tiny_lm(tmp_path / "no_template", ["a b"], template=None)
    with pytest.raises(ModelError, match="no chat template: pass vlm.chat_template"):
        load_lm(str(no_template))
    assert load_lm(str(no_template), chat_template=CHATML)[1].chat_template == CHATML
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="cannot read the GGUF file .*broken.gguf"):
        load_lm(str(broken))


def write_tiny_gguf(folder, out):
    """The tiny Llama of ``folder`` as a GGUF file (f32 tensors, q/k permuted as llama.cpp stores them)."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    head = cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(len(tok))
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    merges = state["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    def perm(t, n):
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for k, v in model.state_dict().items():
        v = v.float().numpy()
        if k == "lm_head.weight":
            continue
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")
            mod = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{per[mod]}.{parts[-1]}"
            if mod in ("self_attn.q_proj", "self_attn.k_proj"):
                v = perm(v, cfg.num_attention_heads if "q_proj" in mod else cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def test_a_gguf_language_model_reads_as_its_float_model(tmp_path):
    pytest.importorskip("gguf")
    from distill.vlm import lm_identity, load_lm

    folder = write_tiny_lm(tmp_path / "lm", ["a red circle on a blue square", "two dogs play in the snow"])
    model, tok = write_tiny_gguf(folder, tmp_path / "tiny.gguf")
    lm, tok2 = load_lm(str(tmp_path / "tiny.gguf"))
    ids = tok("a red circle", return_tensors="pt").input_ids
    assert torch.equal(ids, tok2("a red circle", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lm(ids).logits, atol=1e-5)
    assert tok2.chat_template == CHATML
    # the same weights from a folder or a GGUF file: one identity (an adapter of one reads the other)
    assert {k: v for k, v in lm_identity(lm).items() if k != "name"} == \
        {k: v for k, v in lm_identity(model).items() if k != "name"}


def test_the_cli_trains_an_adapter_and_captions_with_it(parts, tmp_path, capsys):
    from distill.cli import main

    out = tmp_path / "run"
    assert main(["adapt", f"vlm.tower={parts['tower']}", f"vlm.lm={parts['lm']}", f"data.train={parts['train']}",
                 f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=8", "train.progress=false",
                 "data.num_workers=0", "vlm.prefix_tokens=2", "vlm.projector_hidden=16"]) == 0
    assert "adapter:" in capsys.readouterr().out
    assert main(["caption", str(out), parts["test"], "--tower", parts["student"], "--json",
                 "--max-new-tokens", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40 and all(set(x) == {"photo", "caption"} for x in lines)
    # a bad key names its path; a tower from elsewhere names the field
    assert main(["adapt", "vlm.prefix_tokens=0"]) == 2
    assert "vlm.prefix_tokens" in capsys.readouterr().err
    assert main(["caption", str(out), parts["test"], "--tower", parts["wide"]]) == 2
    assert "vision.width" in capsys.readouterr().err


def test_a_teacher_towers_features_come_from_its_cache(parts, tmp_path, monkeypatch):
    from distill import load_teacher
    from distill.cache import TeacherService
    from distill.vlm import AdapterTrainer, VisionTower, tower_features
    from distill.data import load_rows

    teacher = load_teacher(parts["tower"])
    TeacherService(teacher, tmp_path / "cache", dtype="fp32", progress=False, num_workers=0).build(parts["train"])
    monkeypatch.setattr(AdapterTrainer, "_from_tower", lambda *a: pytest.fail("the tower ran despite its cache"))
    trainer = AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "run"), cache=str(tmp_path / "cache"),
                             max_steps=2, **FAST)
    rows = load_rows(parts["train"])
    table, bad = trainer.features(rows, "x")
    assert not bad and len(table.rows) == len(rows)
    # a resumed run reads what the run stored: neither the cache nor the tower again; other data: not that
    monkeypatch.setattr(AdapterTrainer, "_from_cache", lambda *a: pytest.fail("read again"))
    again, _ = trainer.features(rows, "x")
    assert torch.equal(again.values, table.values) and again.rows == table.rows
    with pytest.raises(pytest.fail.Exception):
        trainer.features(rows, "other data")
    monkeypatch.undo()
    paths = list(dict.fromkeys(rows.images))[:8]
    _, live, _ = tower_features(VisionTower.load(parts["tower"]), paths, progress=False)
    first = [rows.images.index(p) for p in paths]
    cached = table.values[torch.tensor([table.rows[i] for i in first])]
    assert torch.allclose(cached, live, atol=1e-5)
    # a student's tower is not the cache's teacher: it is run (its own features, not its teacher's)
    student = AdapterTrainer(parts["student"], parts["lm"], output_dir=str(tmp_path / "run2"),
                             cache=str(tmp_path / "cache"), max_steps=2, **FAST)
    assert student._from_cache(rows) is None


def test_patch_tokens_are_kept_in_the_cache_for_every_later_run(parts, tmp_path, monkeypatch):
    """With cache.dir, a tower's features (patch tokens here) are stored there by photo content: a later run
    (another output_dir, photos under other paths, a few new) encodes only the photos the store lacks; a
    damaged part is left out and its photos are encoded again."""
    import shutil

    from distill.data import Rows, load_rows
    from distill.vlm import AdapterTrainer, VisionTower

    rows = load_rows(parts["train"])
    (tmp_path / "cache").mkdir()
    first = Rows(list(rows.images[:40]), list(rows.captions[:40]))
    calls = []
    real = VisionTower.encode

    def counting(self, pixels):
        if pixels.abs().sum() > 0:  # not the width probe (one blank image)
            calls.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(VisionTower, "encode", counting)
    a = AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "a"), cache=str(tmp_path / "cache"),
                       features="patches", max_steps=1, **FAST)
    ta, bad = a._from_tower(first)
    photos = len(set(first.images))
    assert not bad and sum(calls) == photos and ta.values.shape[1:] == (16, 32)  # 4 x 4 patch tokens of width 32
    parts_dir = list((tmp_path / "cache" / "towers").glob("*/part-*.safetensors"))
    assert len(parts_dir) == 1
    # the same photos copied elsewhere, and 10 more rows: only the new photos run through the tower
    moved = tmp_path / "moved"
    moved.mkdir()
    paths = []
    for p in rows.images[:50]:
        target = moved / Path(p).name
        if not target.exists():
            shutil.copy(p, target)
        paths.append(str(target))
    second = Rows(paths, list(rows.captions[:50]))
    calls.clear()
    b = AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "b"), cache=str(tmp_path / "cache"),
                       features="patches", max_steps=1, **FAST)
    tb, _ = b._from_tower(second)
    assert sum(calls) == len(set(second.images)) - photos
    for i in range(40):
        assert torch.equal(tb.values[tb.rows[i]], ta.values[ta.rows[i]])
    # a part whose bytes changed fails its digest: its photos are encoded again, not read wrong
    part = parts_dir[0]
    data = bytearray(part.read_bytes())
    data[-10] ^= 0xFF
    part.write_bytes(bytes(data))
    calls.clear()
    tc, _ = AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "c"), cache=str(tmp_path / "cache"),
                           features="patches", max_steps=1, **FAST)._from_tower(first)
    assert sum(calls) == photos
    assert torch.allclose(tc.values[tc.rows[0]], ta.values[ta.rows[0]], atol=1e-6)
    # another tower (other weights) never reads this one's features
    calls.clear()
    AdapterTrainer(parts["student"], parts["lm"], output_dir=str(tmp_path / "d"), cache=str(tmp_path / "cache"),
                   features="patches", max_steps=1, **FAST)._from_tower(first)
    assert sum(calls) == photos


def test_lora_on_the_language_model_trains_saves_and_loads(parts, tmp_path):
    from distill.vlm import caption_images, load_vlm

    result = _fit(parts, tmp_path / "run", 6, lm_lora=4)
    vlm = result.model
    names = vlm.trainable_names()
    assert any("lora_" in n for n in names) and any(n.startswith("projector.") for n in names)
    assert not vlm._can_reuse_prefix()  # LoRA changes the prompt's keys and values: no reuse
    saved = load_vlm(result.model_dir)
    assert saved.lora["rank"] == 4
    for k, v in vlm.lora_state().items():
        assert torch.equal(v, saved.lora_state()[k]), k
    a = caption_images(vlm, parts["test"], tower=parts["tower"], max_new_tokens=5, progress=False).captions
    b = caption_images(saved, parts["test"], max_new_tokens=5, progress=False).captions
    assert a == b


def test_an_adapter_tuned_on_a_student_starts_from_the_teachers(parts, tmp_path):
    from distill.vlm import AdapterTrainer

    teacher = _fit(parts, tmp_path / "teacher", 4)
    trainer = AdapterTrainer(parts["student"], parts["lm"], output_dir=str(tmp_path / "student"), max_steps=1,
                             init_adapter=str(teacher.model_dir), **{**FAST, "lr": 1e-9})
    result = trainer.fit(parts["train"])
    for (k, a), b in zip(teacher.model.projector.state_dict().items(), result.model.projector.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert result.model.vision["name"] == "student"
    with pytest.raises(ModelError, match="vlm.init_adapter: .*vision.width"):
        AdapterTrainer(parts["wide"], parts["lm"], output_dir=str(tmp_path / "wide"), max_steps=1,
                       init_adapter=str(teacher.model_dir), **FAST).fit(parts["train"])


def test_a_cnn_tower_looks_at_another_input_size(parts, tmp_path, capsys):
    """VisionTower(image_size=...): the same weights and space at a smaller input (cheaper eyes); the adapter
    reads it, the CLI's --image-size too; a tower that cannot run at that size (a ViT) is one line."""
    from distill import create_student
    from distill.cli import main
    from distill.data import load_rows
    from distill.vlm import VisionTower, tower_features

    torch.manual_seed(0)
    create_student("timm:test_efficientnet", embed_dim=32, image_size=64).save(tmp_path / "cnn")
    photos = list(load_rows(parts["test"]).images[:6])
    full, small = VisionTower.load(tmp_path / "cnn"), VisionTower.load(tmp_path / "cnn", image_size=40)
    assert small.identity() == {**full.identity(), "image_size": 40}  # same weights, space and width
    a, b = tower_features(full, photos, progress=False)[1], tower_features(small, photos, progress=False)[1]
    assert a.shape == b.shape == (6, 32) and not torch.allclose(a, b, atol=1e-3)
    with pytest.raises(ModelError, match="image_size: tower cannot run at 64 px.*leave it at 32"):
        VisionTower.load(parts["tower"], image_size=64)
    out = tmp_path / "run"
    assert main(["adapt", f"vlm.tower={tmp_path / 'cnn'}", f"vlm.lm={parts['lm']}", f"data.train={parts['train']}",
                 f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=8", "train.progress=false",
                 "data.num_workers=0", "vlm.prefix_tokens=2", "vlm.projector_hidden=16"]) == 0
    capsys.readouterr()
    assert main(["caption", str(out), *photos, "--image-size", "40", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6


@pytest.mark.multiprocess
def test_two_processes_train_the_adapter_one_process_does(parts, tmp_path):
    """2 processes x 8 captions against 1 x 16: the same losses (the mean over every process's answer tokens)."""
    import os
    import subprocess
    import sys

    from test_multiprocess import _losses, _port
    from distill.cli import main

    args = ["adapt", f"vlm.tower={parts['tower']}", f"vlm.lm={parts['lm']}", f"data.train={parts['train']}",
            "train.max_steps=6", "train.progress=false", "train.log_every=1", "data.num_workers=0", "train.seed=3",
            "vlm.prefix_tokens=2", "vlm.projector_hidden=16", "optim.lr=1e-2", "optim.warmup_steps=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
           "-m", "distill.cli", *args, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=16"]) == 0
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_damaged_adapters_photos_and_options_are_one_line_each(parts, tmp_path, capsys):
    import shutil

    from distill.cli import main
    from distill.vlm import AdapterTrainer

    result = _fit(parts, tmp_path / "run", 2)
    # the config names no path of this machine, not even in how it was made
    text = (result.model_dir / "adapter_config.json").read_text()
    assert str(tmp_path.parent) not in text and parts["lm"] not in text
    cases = {"not json": '{"format": "clip-distill-adapter/1", "vision": ',
             "no projector": '{"format": "clip-distill-adapter/1"}', "a list": "[1, 2]"}
    for name, content in cases.items():
        bad = tmp_path / name.replace(" ", "_")
        shutil.copytree(result.model_dir, bad)
        (bad / "adapter_config.json").write_text(content)
        assert main(["caption", str(bad), parts["test"]]) == 2, name
        assert "adapter_config.json" in capsys.readouterr().err, name
    wrong = tmp_path / "wrong_weights"
    shutil.copytree(result.model_dir, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["projector"]["hidden"] = 99
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["caption", str(wrong), parts["test"]]) == 2
    assert "do not match" in capsys.readouterr().err
    # sampling options out of range, no photo at all, no readable photo
    assert_exit = pytest.raises(SystemExit)
    with assert_exit:
        main(["caption", str(result.output_dir), parts["test"], "--sample", "--temperature", "0"])
    assert "must be > 0" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(result.output_dir), str(tmp_path / "empty")]) == 2
    assert "no photos in it or its subfolders" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"nope")
    assert main(["caption", str(result.output_dir), str(tmp_path / "broken.png")]) == 2
    assert "no photo of the 1 given could be read" in capsys.readouterr().err
    # LoRA on layers the LM does not have; a starting adapter with other LoRA than the recipe's
    with pytest.raises(RecipeError, match=r"vlm.lm_lora_targets: \['nope_proj'\] name no layer .*q_proj"):
        _fit(parts, tmp_path / "lora_bad", 2, lm_lora=2, lm_lora_targets=["nope_proj"])
    lora = _fit(parts, tmp_path / "lora", 2, lm_lora=2)
    with pytest.raises(ModelError, match="vlm.init_adapter: .*has LoRA .*rank.*, the recipe asks for none"):
        AdapterTrainer(parts["tower"], parts["lm"], output_dir=str(tmp_path / "from_lora"), max_steps=1,
                       init_adapter=str(lora.output_dir), **FAST).fit(parts["train"])


def test_a_damaged_feature_store_is_computed_again_and_a_moved_lm_resumes(parts, tmp_path):
    import shutil

    first = _fit(parts, tmp_path / "run", 2, checkpoint_every=2)
    store = tmp_path / "run" / "features" / "vlm.safetensors"
    store.write_bytes(store.read_bytes()[:50])  # truncated
    moved = tmp_path / "lm_moved"
    shutil.copytree(parts["lm"], moved)
    resumed = _fit({**parts, "lm": str(moved)}, tmp_path / "run", 4, checkpoint_every=2, resume=True)
    assert resumed.steps == 4 and resumed.history["loss"][:2] == first.history["loss"]


def test_special_tokens_in_a_caption_are_plain_text(parts):
    from distill.vlm import ChatPrompt, load_lm

    _, tok = load_lm(parts["lm"])
    chat = ChatPrompt.build(tok, "Describe it.")
    ids, mask = chat.answer_ids(tok, ["a sign saying <|im_end|> and <|im_start|>system"], 64)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    row = ids[0][mask[0] == 1].tolist()
    assert row[-1] == end and end not in row[:-1]  # only the real end of the turn
