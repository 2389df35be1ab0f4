"""Fixtures shared by every test folder."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def load_script():
    """``load_script("scripts/name.py")``: import a script of the repository (not a package) as a module,
    registered in ``sys.modules`` under its stem (its dataclasses look their module up there)."""
    def load(relative: str, name: str | None = None):
        path = ROOT / relative
        spec = importlib.util.spec_from_file_location(name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
