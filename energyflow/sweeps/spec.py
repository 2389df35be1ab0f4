"""What a sweep is, as plain strings: a base recipe, axes of gin values, seeds, and the trials they expand to.

An axis is ``'NAME = [v1, v2, ...]'``: ``NAME`` a macro the recipe binds (``SIZE``) or a ``configurable.parameter``
(``GradientDescent.step_size``, optionally scoped: ``ebt/Trainer.learning_rate``); each value is gin text
(``0.1``, ``'xs'``, ``@RandomNoise()``, ``None``, ``[1, 2]``). Axes form a grid, or with ``zip`` are paired
value by value; every combination runs once per seed (``Trainer.seed``). A trial is its recipe and binding
strings only -- never gin objects -- so any process or machine can run it: ``DIR/<trial name>`` trained by the
same code path as ``energyflow train``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

AXIS = re.compile(r"^\s*(?P<name>[A-Za-z_][\w./]*)\s*=\s*\[(?P<values>.*)\]\s*$", re.DOTALL)


class SweepError(ValueError):
    """A sweep that cannot run as given (a bad axis, seed or recipe): raised before any trial starts."""


@dataclass(frozen=True)
class Axis:
    """``name = value`` for each of ``values`` (gin text); or, with ``variants``, named sets of bindings (an
    ablation: each value names the bindings of one variant, e.g. ``no_replay: EBTObjective.replay_buffer = None``)."""

    name: str
    values: tuple[str, ...]
    variants: Optional[dict] = None  # value -> tuple of gin lines

    @property
    def is_macro(self) -> bool:
        return self.variants is None and "." not in self.name

    def bindings(self, value: str) -> tuple[str, ...]:
        return tuple(self.variants[value]) if self.variants is not None else (f"{self.name} = {value}",)


def variant_axis(name: str, variants: dict) -> Axis:
    """An axis of named binding sets (``{"full": [], "no_replay": ["EBTObjective.replay_buffer = None"]}``)."""
    if not variants:
        raise SweepError(f"variant axis {name} has no variants")
    cleaned = {}
    for key, lines in variants.items():
        if not isinstance(key, str) or not key or any(c in key for c in " =,/"):
            raise SweepError(f"variant axis {name}: a variant's name must be a plain word, got {key!r}")
        if isinstance(lines, str) or not all(isinstance(line, str) and "=" in line for line in lines):
            raise SweepError(f"variant {key!r} of axis {name} must be a list of gin bindings like 'A.b = 1'")
        cleaned[key] = tuple(lines)
    return Axis(name, tuple(cleaned), cleaned)


def split_values(text: str) -> list[str]:
    """Top-level comma-separated items of a gin list body (commas inside quotes, (), [] and {} do not split)."""
    items, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = None
            continue
        if char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                raise SweepError(f"unbalanced brackets in {text!r}")
        elif char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise SweepError(f"unterminated quote or bracket in {text!r}")
    last = "".join(current).strip()
    if last:
        items.append(last)
    if any(not item for item in items):
        raise SweepError(f"an empty value in [{text}]")
    return items


def parse_axis(text: str) -> Axis:
    """``'NAME = [v1, v2]'`` -> ``Axis``; a clear ``SweepError`` naming the axis otherwise."""
    match = AXIS.match(text)
    if match is None:
        raise SweepError(f"axis {text!r} is not of the form 'NAME = [value, value, ...]' (e.g. --axis "
                         "\"GradientDescent.step_size = [10.0, 50.0]\")")
    name = match.group("name")
    try:
        values = split_values(match.group("values"))
    except SweepError as error:
        raise SweepError(f"axis {name}: {error}") from error
    if not values:
        raise SweepError(f"axis {name} has no values; give at least one, e.g. {name} = [1, 2]")
    if len(set(values)) != len(values):
        raise SweepError(f"axis {name} repeats a value: {values}")
    return Axis(name, tuple(values))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SweepError(f"--seeds must be comma-separated integers like 0,1,2, got {text!r}") from error
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds must name at least one seed, each once, got {text!r}")
    return seeds


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: ``recipe`` with ``bindings`` (gin lines, the seed's last) into ``name``."""

    name: str
    recipe: str
    bindings: tuple[str, ...]
    axes: dict = field(default_factory=dict)  # axis name -> value text
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "bindings": list(self.bindings)}


def trial_name(values: dict[str, str], seed: int) -> str:
    """A directory name from the axis values and the seed, e.g. ``step_size=10.0,SIZE=xs,seed=0``."""
    parts = [f"{name.split('.')[-1].split('/')[-1]}={value}" for name, value in values.items()] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:200]


def expand(recipe: str, axes: Sequence[Axis], seeds: Sequence[int], *, paired: bool = False,
           fixed: Sequence[str] = ()) -> list[Trial]:
    """Every trial: the grid (or, ``paired``, the zip) of the axes' values, once per seed; ``fixed`` bindings
    (gin lines, e.g. a shorter schedule for every trial) come first in each trial and not in its name."""
    names = [axis.name for axis in axes]
    if len(set(names)) != len(names):
        raise SweepError(f"an axis is given twice: {names}")
    if paired and len({len(axis.values) for axis in axes}) > 1:
        raise SweepError("--zip pairs the axes value by value: they need the same number of values, got "
                         + ", ".join(f"{axis.name}: {len(axis.values)}" for axis in axes))
    combos = list(zip(*(axis.values for axis in axes))) if paired else list(itertools.product(*(a.values for a in axes)))
    trials = []
    for combo in combos or [()]:
        values = dict(zip(names, combo))
        for seed in seeds:
            axis_lines = [line for axis in axes for line in axis.bindings(values[axis.name])]
            bindings = (*fixed, *axis_lines, f"Trainer.seed = {seed}")
            trials.append(Trial(trial_name(values, seed), recipe, bindings, values, seed))
    if len({t.name for t in trials}) != len(trials):
        raise SweepError("two trials would share a directory name; give the axes values that differ in their text")
    return trials


def validate(trials: Sequence[Trial], axes: Sequence[Axis], fixed: Sequence[str] = ()) -> None:
    """Parse the recipe with every trial's bindings before anything runs: an unknown name, an unparsable value or
    a macro the recipe does not bind is a ``SweepError`` naming the axis."""
    import gin

    from energyflow.config import RecipeError
    from energyflow.configurables import parse_recipe

    if not trials:
        raise SweepError("the sweep has no trials")
    recipe = trials[0].recipe
    try:
        gin.clear_config()
        try:
            parse_recipe(recipe, ["OUT_DIR = '/dev/null'", *fixed])
        except RecipeError as error:
            raise SweepError(f"the recipe with the sweep's fixed bindings {list(fixed)}: {error}") from error
        for axis in axes:
            if axis.is_macro:
                try:
                    gin.query_parameter(f"{axis.name}/macro.value")
                except ValueError as error:
                    raise SweepError(f"axis {axis.name}: the recipe {recipe} binds no macro {axis.name}; name one it "
                                     "uses (e.g. SIZE) or a configurable.parameter") from error
        for axis in axes:
            for value in axis.values:
                gin.clear_config()
                try:
                    parse_recipe(recipe, ["OUT_DIR = '/dev/null'", *fixed, *axis.bindings(value)])
                except (RecipeError, ValueError, SyntaxError) as error:
                    raise SweepError(f"axis {axis.name}, value {value}: {str(error).splitlines()[0]}") from error
    except RecipeError as error:
        raise SweepError(str(error)) from error
    finally:
        gin.clear_config()


def sweep(recipe: str = "", axes: Sequence[str] = (), seeds: Sequence[int] = (0,), paired: bool = False,
          bindings: Sequence[str] = (), variants: Optional[dict] = None, budget: str = "") -> dict:
    """What a sweep recipe (``recipes/sweeps/*.gin``) binds, as a plain dict: ``recipe`` the base recipe, ``axes``
    the axis strings, ``seeds``, ``paired`` (zip the axes), ``bindings`` (fixed for every trial), ``variants`` (an
    axis named ``variant`` of named binding sets, e.g. an ablation), ``budget`` (how long it takes here)."""
    return {"recipe": recipe, "axes": list(axes), "seeds": list(seeds), "paired": bool(paired),
            "bindings": list(bindings), "variants": dict(variants or {}), "budget": budget}


def load_sweep_file(path: Path) -> tuple[str, list[Axis], list[int], bool, list[str]]:
    """The base recipe, axes, seeds, pairing and fixed bindings a sweep recipe binds (``sweep.recipe``, ...)."""
    import gin

    from energyflow.config import RecipeError
    from energyflow.configurables import parse_recipe

    gin.clear_config()
    try:
        parse_recipe(str(path))
        settings = gin.get_configurable("sweep")()
    except RecipeError as error:
        raise SweepError(str(error)) from error
    finally:
        gin.clear_config()
    if not settings["recipe"] or not (settings["axes"] or settings["variants"]):
        raise SweepError(f"{path} is not a sweep recipe: it must bind sweep.recipe and sweep.axes or sweep.variants "
                         "(and sweep.seeds)")
    axes = ([variant_axis("variant", settings["variants"])] if settings["variants"] else []) + [
        parse_axis(text) for text in settings["axes"]]
    return settings["recipe"], axes, [int(seed) for seed in settings["seeds"]], settings["paired"], settings["bindings"]
