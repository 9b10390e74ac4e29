from pathlib import Path

import pytest

from distill.config import Recipe, RecipeError, apply_options, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert (r.teacher.name or path.name.startswith(("tune_", "vlm_"))) and r.student.name and r.train.max_steps > 0
    if path.name.startswith("vlm_"):  # an adapter recipe names its language model
        assert r.vlm.lm and r.vlm.prefix_tokens > 0


def test_at_least_the_four_required_recipes():
    names = {p.stem for p in RECIPES}
    assert {"vit_tiny_from_vit_b32", "resnet18_from_vit_b32", "mobilevit_s_from_vit_b32",
            "bert_small_from_vit_b32"} <= names


def test_unknown_key_names_the_path_and_suggests(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("loss:\n  wieghts: {cosine: 1.0}\n")
    with pytest.raises(RecipeError, match=r"loss\.wieghts: unknown key; did you mean loss\.weights\?"):
        load_recipe(f)
    f.write_text("trian: {lr: 1}\n")
    with pytest.raises(RecipeError, match=r"trian: unknown key; did you mean train\?"):
        load_recipe(f)


def test_wrong_types_fail_with_path(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  max_steps: many\n")
    with pytest.raises(RecipeError, match=r"train\.max_steps: expected an integer, got 'many'"):
        load_recipe(f)
    f.write_text("loss:\n  weights: {cosine: high}\n")
    with pytest.raises(RecipeError, match=r"loss\.weights\.cosine: expected a number"):
        load_recipe(f)
    f.write_text("data:\n  crop_scale: [0.5]\n")
    with pytest.raises(RecipeError, match=r"data\.crop_scale: expected 2 values"):
        load_recipe(f)


def test_yaml_delta_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim: {lr: 1e-4}\ntrain: {batch_size: 8}\n")  # YAML 1.1 reads 1e-4 as a string
    r = load_recipe(f, ["train.max_steps=7", "loss.weights={mse: 2}", "data.train=x.csv"])
    assert r.optim.lr == pytest.approx(1e-4)
    assert r.train.batch_size == 8 and r.train.max_steps == 7
    assert r.loss.weights == {"mse": 2.0}
    assert r.data.train == "x.csv"
    assert r.optim.weight_decay == Recipe().optim.weight_decay  # untouched defaults stay
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key"):
        load_recipe(f, ["train.lrr=1"])


def test_flat_options():
    r = apply_options(Recipe(), {"lr": 0.5, "batch_size": 3, "loss_weights": {"cosine": 1}, "image_size": 64})
    assert (r.optim.lr, r.train.batch_size, r.loss.weights, r.data.image_size) == (0.5, 3, {"cosine": 1.0}, 64)
    with pytest.raises(RecipeError, match="max_step: unknown option; did you mean max_steps"):
        apply_options(Recipe(), {"max_step": 3})
    with pytest.raises(RecipeError, match="train.batch_size: expected an integer"):
        apply_options(Recipe(), {"batch_size": "big"})
