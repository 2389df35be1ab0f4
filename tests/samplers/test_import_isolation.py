"""``import samplers`` stays standalone: no gin, no energyflow, no architectures."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_samplers_pulls_in_no_framework_module():
    code = (
        "import sys, samplers\n"
        "from samplers import HMC, MALA, NUTS, GradientDescent, Langevin\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gin', 'energyflow', 'architectures'))\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert result.stdout.strip() == "", f"import samplers imported {result.stdout.strip()}"
