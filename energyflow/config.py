"""Finding, parsing and listing gin recipes.

Recipes live under one root (``recipes/`` beside the packages, or ``$ENERGYFLOW_RECIPES``). A recipe
file may be named by its path, by its path under the root, or by that path without ``.gin``. Every
``include`` inside a recipe resolves from the root, never from the current working directory.
"""
from __future__ import annotations

import contextlib
import os
import re
import tokenize
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import gin

RECIPES_ENV = "ENERGYFLOW_RECIPES"


class RecipeError(ValueError):
    """A recipe that cannot be found or parsed; the message names the file and line when gin knows them."""


def recipes_root() -> Path:
    """``$ENERGYFLOW_RECIPES`` if set, else the ``recipes/`` directory next to the ``energyflow`` package."""
    override = os.environ.get(RECIPES_ENV)
    root = Path(override) if override else Path(__file__).resolve().parent.parent / "recipes"
    if not root.is_dir():
        raise RecipeError(f"recipes root {root} does not exist; set {RECIPES_ENV} to the recipes directory")
    return root


def resolve_recipe(name: Union[str, Path], root: Optional[Path] = None) -> Path:
    """The recipe file for ``name``: an existing path, else a path under the root (``recipes/`` prefix,
    ``.gin`` suffix optional)."""
    root = root or recipes_root()
    path = Path(name)
    relative = Path(*path.parts[1:]) if path.parts and path.parts[0] == "recipes" else path
    candidates = [path, root / relative, root / relative.with_suffix(".gin")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"no recipe {str(name)!r} (looked at {[str(c) for c in candidates]}); "
                      "list the available ones with `energyflow recipes`")


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    # gin resolves relative includes against the working directory first; parsing from the root makes
    # `include 'models/x.gin'` mean the same file wherever the user runs the command.
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")


def check_includes(path: Path, root: Path, seen: Optional[set] = None) -> None:
    """Fail clearly (file, line, root) on an ``include`` of a missing file, before gin trips over it."""
    seen = set() if seen is None else seen
    if path in seen:
        return
    seen.add(path)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if not match:
            continue
        target = Path(match.group(1)) if Path(match.group(1)).is_absolute() else root / match.group(1)
        if not target.is_file():
            raise RecipeError(f'{path}, line {number}: include {match.group(1)!r} not found under the recipes '
                              f"root {root} (includes resolve from the root, not from the including file)")
        check_includes(target, root, seen)


def parse_recipe(name: Union[str, Path], bindings: Sequence[str] = (), *, root: Optional[Path] = None) -> Path:
    """Parse the recipe and the ``--bind`` overrides into gin's config. Unknown configurables and parameters are
    errors that name the file and line, so the configurables must be registered first:
    ``energyflow.configurables.parse_recipe`` (the one callers use) does that.
    """
    root = root or recipes_root()
    path = resolve_recipe(name, root)
    check_includes(path, root)
    if not _statements(path.read_text()):
        raise RecipeError(f"recipe {path} is empty (no bindings, no includes); a recipe binds at least "
                          "`launch.program` or `train.*`, or includes one that does (see `energyflow recipes`)")
    with _inside(root):
        try:
            gin.parse_config_files_and_bindings([str(path)], [], finalize_config=False)
        except tokenize.TokenError as error:
            raise RecipeError(f"cannot parse recipe {path}: {_unclosed(error, path.read_text())}") from error
        except (ValueError, SyntaxError, OSError) as error:
            raise RecipeError(f"cannot parse recipe {path}: {_gin_reason(error)}") from error
    parse_bindings(bindings)
    return path


def _statements(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _unclosed(error: tokenize.TokenError, text: str) -> str:
    """gin's tokenizer error for a bracket or string left open, as where it was opened and how to fix it."""
    depth, opened = 0, None
    for number, line in enumerate(text.splitlines(), 1):
        for char in line.split("#", 1)[0]:
            if char in "([{":
                depth, opened = depth + 1, opened if depth else number
            elif char in ")]}":
                depth = max(depth - 1, 0)
    where = f"line {opened}" if opened else "the end of the file"
    return f"a bracket opened at {where} is never closed (the file ends inside it); close it"


def _gin_reason(error: BaseException) -> str:
    """gin's message in one line: its first line, then where (file and line) when gin says."""
    text = str(error)
    first = text.splitlines()[0].strip() if text else type(error).__name__
    location = re.search(r'In file "([^"]+)", line (\d+)', text)
    return first + (f" ({location.group(1)}, line {location.group(2)})" if location else "")


def parse_bindings(bindings: Sequence[str]) -> None:
    """Parse ``--bind`` lines one at a time, so that a bad one is named: unknown configurables and parameters,
    unparsable values and unclosed brackets or quotes are ``RecipeError``s saying which binding and why."""
    for binding in bindings:
        try:
            gin.parse_config([binding])
        except tokenize.TokenError:
            raise RecipeError(f"bad --bind {binding!r}: a bracket or quote is never closed; close it") from None
        except (ValueError, SyntaxError) as error:
            reason = str(error).splitlines()[0].strip() if str(error) else type(error).__name__
            if reason.startswith("Unable to parse value"):
                reason = ("its value is not a gin value (a number, 'quoted string', [list], (tuple), True/False, "
                          "None, @configurable or %MACRO); check the quotes and brackets")
            raise RecipeError(f"bad --bind {binding!r}: {reason}") from error


def parse_text(text: str, source: str) -> None:
    """Parse gin ``text`` (e.g. a run's ``operative_config.gin``) with unknown names as errors (registered
    first: ``energyflow.configurables.parse_text``)."""
    try:
        gin.parse_config(text)
    except (ValueError, SyntaxError) as error:
        raise RecipeError(f"cannot parse {source}: {error}") from error


_REQUIRED_MACRO = re.compile(r"^([A-Za-z_][\w.]*) = %gin\.REQUIRED$", re.MULTILINE)


_MACRO_USE = re.compile(r"^([A-Za-z_][\w./]*) = .*?%([A-Za-z_][\w]*(?:\.[\w]+)*)", re.MULTILINE)


def check_required_macros() -> None:
    """Fail if a macro is still ``%gin.REQUIRED`` (gin itself passes such a macro on as a sentinel), or if a
    binding uses a macro that is never defined (gin would only fail when the binding is first used, as
    "macro() missing 1 required positional argument")."""
    text = gin.config_str()
    missing = _REQUIRED_MACRO.findall(text)
    if missing:
        raise RecipeError(f"the recipe leaves required macro(s) {missing} unset; set them in the experiment "
                          f"file or on the command line, e.g. --bind \"{missing[0]} = ...\"")
    for selector, macro in _MACRO_USE.findall(text):
        if macro.startswith("gin."):
            continue
        try:
            gin.query_parameter(f"%{macro}")
        except ValueError:
            raise RecipeError(f"{selector} uses the macro %{macro}, which is never defined; define it in the recipe "
                              f"or with --bind \"{macro} = ...\" (or fix its spelling)") from None


check_macros = check_required_macros


def describe(path: Path) -> str:
    """A recipe's one-line description: its first comment line, without the ``#``."""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_recipes(root: Optional[Path] = None) -> list[tuple[str, str]]:
    """``(path under the root, description)`` for every ``*.gin`` file, sorted by path."""
    root = root or recipes_root()
    return [(path.relative_to(root).as_posix(), describe(path)) for path in sorted(root.rglob("*.gin"))]
