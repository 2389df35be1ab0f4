"""`energyflow eval` (and every command that rebuilds a run) on a run trained from the Python API: one clear line."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from architectures import TransformerConfig, TransformerPP
from energyflow.cli import main
from energyflow.config import RecipeError
from energyflow.runs import load_run
from energyflow.tasks import LanguageModelTask
from energyflow.trainer import Trainer


def _run(cli_args):
    buffer = io.StringIO()
    status = main(cli_args, console=Console(file=buffer, width=1000))
    return status, buffer.getvalue()


@pytest.fixture(scope="module")
def python_run(tmp_path_factory, tiny_data):
    """A run directory written by ``Trainer.fit`` called directly (no gin recipe), as docs/training.md shows."""
    torch.manual_seed(0)
    task = LanguageModelTask(TransformerPP(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=16),
                                           vocab_size=256))
    out = tmp_path_factory.mktemp("python_run")
    Trainer(num_steps=2, batch_size=4, learning_rate=3e-3, eval_batches=1, device="cpu", progress=False).fit(
        task, tiny_data, out)
    return out


def test_a_python_api_run_has_an_empty_operative_config(python_run):
    assert (python_run / "checkpoints").is_dir()
    assert (python_run / "operative_config.gin").read_text() == ""


def test_eval_refuses_a_python_api_run_in_one_line(python_run):
    status, text = _run(["eval", str(python_run)])
    assert status == 1
    lines = text.strip().splitlines()
    assert len(lines) == 1, text  # one line, no traceback
    assert lines[0].startswith("error: ") and "was not trained from a gin recipe" in lines[0]
    assert "operative_config.gin is empty" in lines[0]
    assert "energyflow train RECIPE" in lines[0] and "docs/training.md" in lines[0]


def test_generate_refuses_it_the_same_way(python_run):
    status, text = _run(["generate", str(python_run), "--prompt", "a", "--max-new", "2"])
    assert status == 1 and "was not trained from a gin recipe" in text and "Traceback" not in text


def test_load_run_refuses_a_missing_operative_config(python_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(python_run, copy)
    (copy / "operative_config.gin").unlink()
    with pytest.raises(RecipeError, match="operative_config.gin is missing"):
        load_run(copy, device="cpu")
    (copy / "operative_config.gin").write_text("\n  \n# written by Trainer.fit from Python\n")  # no bindings
    with pytest.raises(RecipeError, match="operative_config.gin is empty"):
        load_run(copy, device="cpu")


def test_a_directory_without_checkpoints_is_still_not_a_run_directory(tmp_path):
    (tmp_path / "operative_config.gin").write_text("")
    status, text = _run(["eval", str(tmp_path)])
    assert status == 1 and "not a run directory" in text
