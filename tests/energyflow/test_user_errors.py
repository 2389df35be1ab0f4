"""The user's path, hardened: every user error is one line naming the file and line, the binding or the parameter,
and the fix, with exit status 1 and no traceback (run as a user runs it: `python -m energyflow.cli` in a
subprocess); checksummed checkpoints with fall-back; run directories that cannot be trained into are refused
before anything is written; `energyflow --help` imports no torch."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from energyflow import checkpoint as ckpt
from energyflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = "experiments/transformer_pp_debug.gin"
FAST = ["--bind", "NUM_STEPS = 4", "--bind", "Trainer.checkpoint_every = 1", "--bind", "Trainer.eval_every = 0",
        "--bind", "Trainer.eval_batches = 1", "--bind", "Trainer.progress = False"]


def _cli(args, cwd) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "energyflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout + done.stderr


def _in_process(args, width=400) -> tuple[int, str]:
    buffer = io.StringIO()
    status = main(args, console=Console(file=buffer, width=width))
    return status, buffer.getvalue()


def _assert_one_line_error(status: int, output: str, *expected: str) -> None:
    assert status == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad_recipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    (folder / "syntax.gin").write_text(f"include '{DEBUG}'\nTrainer.betas = (0.9,\n  0.99\n")
    (folder / "empty.gin").write_text("# nothing here\n\n")
    (folder / "undefined.gin").write_text(f"include '{DEBUG}'\nTrainer.nope = 1\n")
    return folder


CASES = {
    # name: (extra args after `train RECIPE --out OUT`, the recipe (None: the debug one), texts the error names)
    "gin syntax error": ([], "syntax.gin", ["syntax.gin", "line 2", "never closed"]),
    "undefined parameter in a file": ([], "undefined.gin", ["undefined.gin, line 2", "'nope'"]),
    "empty recipe": ([], "empty.gin", ["empty.gin", "is empty"]),
    "unbalanced --bind": (["--bind", "SIZE = '4xs"], None, ["--bind \"SIZE = '4xs\"", "quote"]),  # 3.11: gin's parse error; 3.12: the tokenizer's
    "unclosed bracket --bind": (["--bind", "Trainer.betas = (0.9, 0.99"], None, ["Trainer.betas", "never closed"]),
    "undefined --bind": (["--bind", "Trainer.sed = 1"], None, ["'Trainer.sed = 1'", "parameter named 'sed'"]),
    "undefined macro": (["--bind", "Trainer.num_steps = %NOPE"], None, ["%NOPE", "never defined",
                                                                         'NOPE = ...']),
    "wrong type": (["--bind", "Trainer.num_steps = 'ten'"], None, ["Trainer.num_steps must be an integer", "'ten'"]),
    "betas not a pair": (["--bind", "Trainer.betas = 0.9"], None, ["Trainer.betas must be a pair", "0.9"]),
    "negative steps": (["--bind", "NUM_STEPS = -3"], None, ["Trainer.num_steps must be >= 1", "-3"]),
    "zero batch size": (["--bind", "Trainer.batch_size = 0"], None, ["Trainer.batch_size must be >= 1"]),
    "sequence longer than the data": (["--bind", "SEQ_LEN = 100000000"], None, ["cannot fill one window",
                                                                                 "shorter seq_len"]),
    "unknown size preset": (["--bind", "SIZE = 'huge'"], None, ["'huge'", "choose one of", "'4xs'"]),
    "unknown device": (["--bind", "Trainer.device = 'tpu'"], None, ["'tpu'", "'cpu'"]),
    "grad_clip as a string": (["--bind", "Trainer.grad_clip = 'none'"], None, ["Trainer.grad_clip", "None for no"]),
    "fractional eval_every": (["--bind", "Trainer.eval_every = 0.5"], None, ["Trainer.eval_every must be an integer"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_setting_is_one_line_and_writes_nothing(case, bad_recipes, tmp_path):
    extra, recipe, expected = CASES[case]
    out = tmp_path / "run"
    recipe_path = str(bad_recipes / recipe) if recipe else DEBUG
    status, output = _cli(["train", recipe_path, "--out", str(out), *extra], cwd=tmp_path)
    _assert_one_line_error(status, output, *expected)
    assert not out.exists()  # refused when the run is built: before step 1, before any file


def test_debug_shows_the_traceback_instead(tmp_path):
    status, output = _cli(["--debug", "train", DEBUG, "--out", str(tmp_path / "run"), "--bind",
                           "Trainer.grad_clip = 'none'"], cwd=tmp_path)
    assert status == 1 and "Traceback" in output and "Trainer.grad_clip" in output


def test_the_other_commands_answer_in_one_line(tmp_path):
    """eval, think, generate, sweep and report on input that cannot work (through the CLI, one process each)."""
    (tmp_path / "afile").write_text("x")
    cases = [
        (["eval", str(tmp_path / "nowhere")], ["not a run directory"]),
        (["eval", str(tmp_path), "--max-steps", "0"], ["--max-steps must be >= 1"]),
        (["think", str(tmp_path / "nowhere")], ["not a run directory"]),
        (["generate", str(tmp_path / "nowhere"), "--prompt", "x"], ["not a run directory"]),
        (["sweep", DEBUG, "--axis", "Nope.x = [1]", "--out", str(tmp_path / "s")], ["axis Nope.x", "'Nope'"]),
        (["sweep", DEBUG, "--axis", "NUM_STEPS = []", "--out", str(tmp_path / "s")], ["NUM_STEPS"]),
        (["report", str(tmp_path / "nowhere")], ["not a sweep directory"]),
        (["train", DEBUG, "--out", str(tmp_path / "afile")], ["afile is an existing file"]),
    ]
    for args, expected in cases:
        status, output = _cli(args, cwd=tmp_path)
        _assert_one_line_error(status, output, *expected)
    assert not (tmp_path / "s").exists()


def test_help_and_recipes_import_no_torch():
    """Not a timing assertion: what makes `--help` slow is importing torch before the arguments are parsed."""
    script = ("import sys\nfrom energyflow.cli import main\n"
              "for argv in (['--help'], ['train', '--help'], ['think', '--help'], ['sweep', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "main(['recipes'])\nprint('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "usage: energyflow think" in done.stdout, done.stderr
    assert done.stdout.strip().endswith("TORCH False")


# --- run directories and checkpoints ---------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path):
    """The Transformer++ debug recipe, 4 steps with a checkpoint after each (3 kept: steps 2, 3, 4)."""
    out = tmp_path / "run"
    status, output = _in_process(["train", DEBUG, "--out", str(out), *FAST])
    assert status == 0, output
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_carry_checksums_and_pruning_removes_them(trained):
    checkpoints = ckpt.list_checkpoints(trained / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt"]
    sidecars = sorted(p.name for p in (trained / "checkpoints").glob("*.sha256"))
    assert sidecars == [p.name + ".sha256" for p in checkpoints]
    assert all(ckpt.verify_checkpoint(p) for p in checkpoints)
    payload = ckpt.load_checkpoint(checkpoints[-1])
    lines = (trained / "history.jsonl").read_text().splitlines()
    assert payload["history_sha256"] == ckpt.history_digest(lines)  # the history as it stood at step 4


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_a_flipped_byte_anywhere_is_caught_and_the_previous_checkpoint_used(trained, fraction):
    newest = ckpt.latest_checkpoint(trained / "checkpoints")
    _flip(newest, int(fraction * newest.stat().st_size))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(newest)
    assert ckpt.newest_verified(trained / "checkpoints").name == "step_00000003.pt"  # what the NaN guard names
    path, payload, notes = ckpt.load_newest_verified(trained / "checkpoints")
    assert path.name == "step_00000003.pt" and payload["step"] == 3
    assert any("step_00000004.pt" in note for note in notes) and "falling back to step_00000003.pt" in notes[-1]
    status, output = _in_process(["eval", str(trained), "--no-progress"])
    assert status == 0 and "(step 3)" in output and "falling back to step_00000003.pt" in output


def test_a_run_resumes_from_the_newest_checkpoint_that_verifies_and_says_so(trained, capsys):
    _flip(ckpt.latest_checkpoint(trained / "checkpoints"), 1000)
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--bind", "NUM_STEPS = 5"])
    assert status == 0, output
    output = " ".join(capsys.readouterr().out.split())  # the trainer's own console, unwrapped
    assert "falling back to step_00000003.pt" in output and "resuming" in output and "from step 3" in output
    history = [json.loads(line)["step"] for line in (trained / "history.jsonl").read_text().splitlines()]
    assert history == [1.0, 2.0, 3.0, 4.0, 5.0]  # steps 4 and 5 redone from step 3
    assert all(ckpt.verify_checkpoint(p) for p in ckpt.list_checkpoints(trained / "checkpoints"))


def test_when_no_checkpoint_verifies_the_run_is_refused_and_nothing_is_touched(trained):
    checkpoints = ckpt.list_checkpoints(trained / "checkpoints")
    for path in checkpoints:
        _flip(path, 5000)
    before = {p.name: p.read_bytes() for p in checkpoints}
    for args in (["train", DEBUG, "--out", str(trained), *FAST], ["eval", str(trained)]):
        status, output = _in_process(args)
        _assert_one_line_error(status, output, "no checkpoint", "verifies", "--fresh")
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(trained / "checkpoints")} == before


def test_an_edited_history_is_kept_aside_on_resume(trained, capsys):
    history = trained / "history.jsonl"
    history.write_text(history.read_text().replace('"step": 2.0', '"step": 2.0, "edited": 1'))
    status, _ = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--bind", "NUM_STEPS = 5"])
    assert status == 0 and "history.jsonl does not match" in " ".join(capsys.readouterr().out.split())
    assert '"edited": 1' in (trained / "history.jsonl.unverified").read_text()


def test_history_without_checkpoints_is_refused_and_fresh_moves_it_aside(trained):
    for path in (trained / "checkpoints").iterdir():
        path.unlink()
    history = (trained / "history.jsonl").read_text()
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST])
    _assert_one_line_error(status, output, "history of 4 training steps", "no checkpoints", "--fresh")
    assert (trained / "history.jsonl").read_text() == history  # not overwritten
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--fresh"])
    assert status == 0, output
    (aside,) = trained.parent.glob("run.previous-*")
    assert (aside / "history.jsonl").read_text() == history  # nothing lost
    assert ckpt.latest_checkpoint(trained / "checkpoints").name == "step_00000004.pt"


def test_another_recipes_run_is_refused_with_the_difference_and_resumable_changes_are_not(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--bind", "Trainer.learning_rate = 0.5"])
    _assert_one_line_error(status, output, "different recipe or settings", "Trainer.learning_rate:", "-> 0.5",
                           "--fresh")
    status, output = _in_process(["train", "experiments/ebt_system1_debug.gin", "--out", str(trained), *FAST])
    _assert_one_line_error(status, output, "different recipe or settings", "EBT")
    assert {p.name: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before  # nothing written
    # what a resume may change: the step budget, progress, checkpoint cadence
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--bind", "NUM_STEPS = 6",
                                  "--bind", "Trainer.checkpoint_every = 2", "--bind", "Trainer.progress = True"])
    assert status == 0 and "from step 4" in " ".join(capsys.readouterr().out.split()), output


def test_resume_false_on_an_existing_run_names_the_ways_out(trained):
    status, output = _in_process(["train", DEBUG, "--out", str(trained), *FAST, "--bind", "Trainer.resume = False"])
    _assert_one_line_error(status, output, "Trainer.resume is False", "--fresh", "new --out")


def test_config_bindings_resolve_macros_and_join_continuation_lines():
    from energyflow.trainer import config_bindings, config_differences

    text = ("# Macros:\nN = 5\nSIZE = 'xs'\n\n# Parameters for Trainer:\nTrainer.num_steps = %N\n"
            "Trainer.betas = (0.9,\n    0.95)\nscope/f.size = [%SIZE, 2]\n")
    assert config_bindings(text) == {"Trainer.num_steps": "5", "Trainer.betas": "(0.9, 0.95)",
                                     "scope/f.size": "['xs', 2]"}
    changed = text.replace("SIZE = 'xs'", "SIZE = 'xxs'").replace("N = 5", "N = 9")
    assert config_differences(text, changed) == ["scope/f.size: ['xs', 2] -> ['xxs', 2]"]  # num_steps may change
