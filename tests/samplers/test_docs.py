"""docs/samplers.md stays runnable: its python code blocks execute, in order, in one namespace."""
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "samplers.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_the_promised_examples():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    for name in ("HMC(", "GradientDescent(", "differentiable=True", "truncate=", "NUTS(", "summary("):
        assert name in joined, name


def test_docs_python_blocks_run(capsys):
    namespace: dict = {"__name__": "docs_samplers"}
    for index, block in enumerate(python_blocks(DOC.read_text())):
        exec(compile(block, f"{DOC.name} python block {index}", "exec"), namespace)
    assert "HMC on a ring" in capsys.readouterr().out  # the summary table printed
    assert namespace["descent"].step_size.grad is not None  # the learnable step size received a gradient
    assert torch.isfinite(namespace["reference"].states).all()


def test_the_benchmark_table_is_filled_in():
    assert "BENCHMARK_TABLE" not in DOC.read_text(), "paste benchmarks/results/samplers.md into the docs"
