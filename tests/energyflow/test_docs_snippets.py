"""README.md and docs/*.md stay true: every ```python block runs as written, and every `energyflow ...` command
line in the other fenced blocks names a real subcommand, real options and recipes that exist.

Python blocks run file by file, each file's blocks in order in one namespace (as a reader pastes them), in a
temporary working directory (nothing is written into the repository). A block that cannot run here is marked in
the markdown, on the line right before its fence, with ``<!-- snippet: skip (the reason) -->``; that exact
marker, with a reason, is the only way to skip one. docs/samplers.md is executed by tests/samplers/test_docs.py
(with checks of its own), so it is not run a second time here.

Command lines are parsed with the real argument parser (``energyflow.cli.build_parser``) without running their
handler; ``train`` and ``sweep`` recipes must resolve under ``recipes/``; a ``train`` line's recipe is parsed by
gin with its ``--bind`` lines; a ``generate`` line on a run the docs train must fit that run's context.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gin
import pytest
import torch

from energyflow.cli import build_parser
from energyflow.config import resolve_recipe
from energyflow.configurables import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose python blocks another test executes (with assertions of its own): page -> that test.
EXECUTED_ELSEWHERE = {"docs/samplers.md": "tests/samplers/test_docs.py"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
SKIP = re.compile(r"^[ \t]*<!-- snippet: skip \((?P<reason>.*\S.*)\) -->[ \t]*$")
ANY_MARKER = re.compile(r"<!--\s*snippet\b")


@dataclass
class Block:
    path: Path
    lang: str
    line: int  # 1-based line of the opening fence
    code: str  # dedented by the fence's indentation
    skip: Optional[str]  # the reason of a skip marker on the line before the fence


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file (fences may be indented, e.g. inside a list item)."""
    lines = path.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, start = match["indent"], index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        assert index < len(lines), f"{path.name}:{start + 1}: unclosed code fence"
        previous = lines[start - 1] if start else ""
        marker = SKIP.match(previous)
        reason = marker["reason"] if marker else None
        found.append(Block(path, match["lang"], start + 1, "\n".join(body) + "\n", reason))
        index += 1
    return found


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


PYTHON_PAGES = [path for path in DOCS if any(block.lang == "python" for block in blocks(path))]


# ----------------------------------------------------------------------------------------------- python blocks
def test_the_pages_with_python_are_found():
    names = {relative(path) for path in PYTHON_PAGES}
    assert {"README.md", "docs/training.md", "docs/inference.md", "docs/architectures.md"} <= names, names
    for page, test in EXECUTED_ELSEWHERE.items():
        assert page in names and (ROOT / test).is_file(), (page, test)


def test_skip_markers_are_exact_and_sit_right_before_a_python_fence():
    """A misspelt marker, one without a reason, or one not directly above a python fence skips nothing."""
    for path in DOCS:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not ANY_MARKER.search(line):
                continue
            where = f"{relative(path)}:{number}"
            assert SKIP.match(line), f"{where}: write the marker as <!-- snippet: skip (reason) -->, got {line!r}"
            following = FENCE.match(lines[number]) if number < len(lines) else None
            is_python = following is not None and following["lang"] == "python"
            assert is_python, f"{where}: put the marker on the line right before a ```python fence"
            elsewhere = EXECUTED_ELSEWHERE.get(relative(path))
            assert elsewhere is None, f"{where}: this page's blocks run in {elsewhere}, which ignores markers"


def test_blocks_reads_indented_fences_and_skip_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n- item\n  ```python\n  x = 1\n  ```\n<!-- snippet: skip (needs a CUDA device) -->\n"
                    "```python\ntorch.cuda.init()\n```\n```bash\nenergyflow recipes\n```\n")
    found = blocks(page)
    assert [(b.lang, b.line, b.code, b.skip) for b in found] == [
        ("python", 3, "x = 1\n", None), ("python", 7, "torch.cuda.init()\n", "needs a CUDA device"),
        ("bash", 10, "energyflow recipes\n", None)]
    assert SKIP.match("<!-- snippet: skip () -->") is None  # a marker states its reason


@pytest.mark.parametrize("path", [p for p in PYTHON_PAGES if relative(p) not in EXECUTED_ELSEWHERE], ids=relative)
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/... and any other file a snippet writes land here
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(path):
        if block.lang != "python" or block.skip is not None:
            continue
        # Padding with the fence's line count makes a traceback name the markdown file's own line numbers.
        code = compile("\n" * block.line + block.code, str(path), "exec")
        exec(code, namespace)
        ran += 1
    assert ran, f"{relative(path)}: every python block is skipped"
    gin.clear_config()


# ------------------------------------------------------------------------------------------------ command lines
@dataclass
class Command:
    where: str  # file:line
    text: str
    argv: list[str]  # the arguments after `energyflow` (or `-m energyflow.cli`)
    error: Optional[str] = None  # why the line could not be split into words


COMMAND_LIKE = re.compile(r"(^|[;&|]\s*)\s*energyflow(\s|$)|-m\s+energyflow\.cli\b")


def commands() -> list[Command]:
    """Every `energyflow ...` (or `python|torchrun ... -m energyflow.cli ...`) command in a non-python fence,
    continuation lines joined, `&&` / `;` chains split, comments dropped."""
    found = []
    for path in DOCS:
        for block in blocks(path):
            if block.lang == "python":
                continue
            lines = block.code.splitlines()
            index = 0
            while index < len(lines):
                start, text = index, lines[index]
                while text.rstrip().endswith("\\") and index + 1 < len(lines):
                    index += 1
                    text = text.rstrip()[:-1] + " " + lines[index].strip()
                index += 1
                where = f"{relative(path)}:{block.line + 1 + start}"
                if not COMMAND_LIKE.search(text):
                    continue
                lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
                lexer.whitespace_split = True
                try:
                    tokens = list(lexer)
                except ValueError as error:  # e.g. an unclosed quote: a reader's shell refuses it too
                    found.append(Command(where, text.strip(), [], f"not a shell line: {error}"))
                    continue
                segments = [[]]
                for token in tokens:
                    if token in ("&&", ";", "||", "|", "&"):
                        segments.append([])
                    else:
                        segments[-1].append(token)
                for words in segments:
                    if words[:1] == ["energyflow"]:
                        found.append(Command(where, text.strip(), words[1:]))
                    elif "energyflow.cli" in words[1:] and words[words.index("energyflow.cli") - 1] == "-m":
                        found.append(Command(where, text.strip(), words[words.index("energyflow.cli") + 1:]))
    return found


COMMANDS = commands()


def test_the_command_lines_are_found():
    named = {command.argv[0] for command in COMMANDS if command.argv}
    assert {"train", "eval", "recipes", "generate", "think", "sweep", "report"} <= named, named
    assert any("torchrun" in command.text for command in COMMANDS)  # `-m energyflow.cli` lines count too


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.where)
def test_command_line_parses(command):
    assert command.error is None, f"{command.where}: {command.error}: {command.text}"
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(command.argv)
        except SystemExit as exit:  # argparse's way of refusing a line (or of printing --help)
            pytest.fail(f"{command.where}: `energyflow {shlex.join(command.argv)}` does not parse "
                        f"(exit {exit.code}): {errors.getvalue().strip()}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[:1] in (["train"], ["sweep"])],
                         ids=lambda command: command.where)
def test_command_line_recipe_exists(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolved under recipes/, as from any working directory
    args = build_parser().parse_args(command.argv)
    path = resolve_recipe(args.recipe, RECIPES)
    if args.command == "train":  # the recipe parses with the line's --bind overrides (nothing is built)
        gin.clear_config()
        try:
            parse_recipe(path, [*args.bind, f"OUT_DIR = {str(tmp_path)!r}"], root=RECIPES)
        finally:
            gin.clear_config()


def _context_of(recipe: str) -> Optional[int]:
    gin.clear_config()
    try:
        parse_recipe(recipe, ["OUT_DIR = 'unused'"], root=RECIPES)
        try:
            return int(gin.query_parameter("%SEQ_LEN"))
        except ValueError:
            return None
    finally:
        gin.clear_config()


def test_generate_lines_fit_the_context_of_the_runs_the_docs_train():
    """energyflow/inference/commands.py's rule: prompt bytes + --max-new - 1 <= the model's max_seq_len."""
    parser = build_parser()
    trained = {}  # --out of a documented `train` line -> its recipe
    for command in COMMANDS:
        if command.argv[:1] == ["train"]:
            args = parser.parse_args(command.argv)
            if args.out and not args.bind:
                trained[args.out.rstrip("/")] = args.recipe
    checked = 0
    for command in (c for c in COMMANDS if c.argv[:1] == ["generate"]):
        args = parser.parse_args(command.argv)
        out = next((out for out in trained if args.run_dir.rstrip("/").startswith(out)), None)
        context = _context_of(trained[out]) if out else None
        if context is None:
            continue
        needed = len(args.prompt.encode("utf-8")) + args.max_new - 1
        assert needed <= context, (f"{command.where}: prompt ({len(args.prompt.encode())} bytes) + --max-new "
                                   f"{args.max_new} needs {needed} positions; {trained[out]} has SEQ_LEN {context}")
        checked += 1
    assert checked, "no generate line on a documented run was checked"
