"""gin recipes: every file parses; errors name the file and line; includes resolve from the recipes root;
--bind overrides; required macros are enforced; one binding picks the model size."""
from __future__ import annotations

from pathlib import Path

import gin
import pytest

from energyflow.config import RecipeError, check_required_macros, list_recipes, recipes_root
from energyflow.configurables import parse_recipe, parse_text

ALL_RECIPES = sorted(p.relative_to(recipes_root()).as_posix() for p in recipes_root().rglob("*.gin"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_recipe_parses(name):
    parse_recipe(name)  # unknown configurables or parameters would raise here


def test_tiers_and_debug_variants_exist():
    tiers = {Path(name).parts[0] for name in ALL_RECIPES}
    assert {"models", "runs", "experiments"} <= tiers
    experiments = [n for n in ALL_RECIPES if n.startswith("experiments/") and not n.endswith("_debug.gin")]
    for name in experiments:
        debug = name.replace(".gin", "_debug.gin")
        assert debug in ALL_RECIPES or name.endswith("quickstart.gin"), f"{name} has no debug variant"
    assert all(description for _, description in list_recipes()), "every recipe opens with a comment line"


def _root(tmp_path, monkeypatch, files):
    root = tmp_path / "recipes"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setenv("ENERGYFLOW_RECIPES", str(root))
    return root


def test_unknown_parameter_names_file_and_line(tmp_path, monkeypatch):
    _root(tmp_path, monkeypatch, {"models/m.gin": "# a model\nTrainer.seed = 1\nTrainer.learning_rat = 0.1\n",
                                  "experiments/e.gin": "# an experiment\ninclude 'models/m.gin'\n"})
    with pytest.raises(RecipeError, match=r"(?s)doesn't have a parameter named 'learning_rat'.*models/m.gin, line 3"):
        parse_recipe("experiments/e.gin")


def test_unknown_configurable_names_file_and_line(tmp_path, monkeypatch):
    _root(tmp_path, monkeypatch, {"experiments/e.gin": "# x\n\nTraner.seed = 1\n"})
    with pytest.raises(RecipeError, match=r"(?s)No configurable matching 'Traner'.*e.gin, line 3"):
        parse_recipe("experiments/e")


def test_unknown_reference_and_missing_include_name_file_and_line(tmp_path, monkeypatch):
    _root(tmp_path, monkeypatch, {"experiments/a.gin": "# x\ntrain.task = @LanguageModelTsk\n",
                                  "experiments/b.gin": "# x\n\ninclude 'models/nope.gin'\n"})
    with pytest.raises(RecipeError, match=r"(?s)No configurable matching reference '@LanguageModelTsk'.*line 2"):
        parse_recipe("experiments/a.gin")
    with pytest.raises(RecipeError, match=r"b.gin, line 3: include 'models/nope.gin' not found"):
        parse_recipe("experiments/b.gin")


def test_includes_resolve_from_the_recipes_root_not_the_cwd(tmp_path, monkeypatch):
    _root(tmp_path, monkeypatch, {"models/m.gin": "# root copy\nTrainer.seed = 1\n",
                                  "experiments/e.gin": "# x\ninclude 'models/m.gin'\n"})
    elsewhere = tmp_path / "cwd"
    (elsewhere / "models").mkdir(parents=True)
    (elsewhere / "models" / "m.gin").write_text("Trainer.seed = 2\n")
    monkeypatch.chdir(elsewhere)
    parse_recipe("experiments/e.gin")
    assert gin.query_parameter("Trainer.seed") == 1


def test_bind_overrides_and_size_is_one_binding():
    parse_recipe("experiments/transformer_pp_debug.gin", ["SIZE = '3xs'", "Trainer.seed = 7"])
    config = gin.get_configurable("transformer_preset")()
    assert (config.num_layers, config.num_heads, config.dim) == (4, 4, 256)
    assert gin.get_configurable("paper_learning_rate")() == 0.0018  # the learning rate follows the size
    assert gin.query_parameter("Trainer.seed") == 7


def test_the_bidirectional_backbone_is_a_gin_configurable():
    parse_text("BidirectionalTransformer.config = @BidirectionalConfig()\n"
               "BidirectionalConfig.image_size = 8\nBidirectionalConfig.patch_size = 4\n"
               "BidirectionalConfig.dim = 16\nBidirectionalConfig.num_layers = 1\nBidirectionalConfig.num_heads = 2\n",
               "bidirectional.gin")
    model = gin.get_configurable("BidirectionalTransformer")()
    assert model.config.num_patches == 4 and model.config.dim == 16


def test_bad_binding_and_missing_recipe_are_clear():
    with pytest.raises(RecipeError, match="bad --bind 'Trainer.sed = 1': .*parameter named 'sed'"):
        parse_recipe("experiments/transformer_pp_debug.gin", ["Trainer.sed = 1"])
    with pytest.raises(RecipeError, match="no recipe 'experiments/nope'"):
        parse_recipe("experiments/nope")


def test_required_macros_must_be_set():
    parse_recipe("runs/pretrain_text.gin", ["SIZE = '4xs'", "SEQ_LEN = 8", "NUM_STEPS = 1"])
    with pytest.raises(RecipeError, match=r"required macro\(s\) \['OUT_DIR'\]"):
        check_required_macros()
    gin.parse_config("OUT_DIR = '/tmp/x'")
    check_required_macros()


def test_corpus_is_swappable_by_binding(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 20)  # 200 bytes
    parse_recipe("experiments/transformer_pp_debug.gin", [
        "text_data.corpus = @text_files()", f"text_files.paths = ['{corpus}']", "SEQ_LEN = 9",
        "text_data.validation_fraction = 0.1"])
    data = gin.get_configurable("text_data")()
    assert data.train.shape == (19, 10) and data.validation.shape == (2, 10)  # 180 and 20 bytes, stride 9


# The baseline's debug variant is trained in full by test_cli.py (golden curve); the others here, briefly.
OTHER_DEBUG = [n for n in ALL_RECIPES if n.endswith("_debug.gin") and n != "experiments/transformer_pp_debug.gin"]


@pytest.mark.parametrize("name", OTHER_DEBUG)
def test_debug_variant_trains_two_steps(name, tmp_path, request):
    corpus = [f"DATA_DIR = '{request.getfixturevalue('token_corpus')}'"] if "_tokens_" in name else []
    parse_recipe(name, ["Trainer.num_steps = 2", "Trainer.progress = False", f"OUT_DIR = '{tmp_path}'", *corpus])
    gin.get_configurable("launch")()
    assert list(tmp_path.rglob("step_00000002.pt")), "no final checkpoint written"


def test_gin_text_registration_and_programs_import_one_way():
    """config (gin text) <- experiment (the programs) <- configurables (registration) <- runs (re-building a
    run): no module imports one later in that chain, at the top or inside a function."""
    import ast

    order = ["config", "experiment", "configurables", "runs"]
    package = Path(__file__).resolve().parents[2] / "energyflow"
    for position, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {f"energyflow.{alias.name}" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module == "energyflow" for alias in node.names}
        later = {f"energyflow.{other}" for other in order[position + 1:]}
        assert not imported & later, f"energyflow/{name}.py imports {sorted(imported & later)}"
