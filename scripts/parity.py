"""energyflow's side of the parity check against the paper's reference code (docs/fidelity.md).

Trains ``recipes/experiments/quickstart.gin`` (4xs, sequence 64, batch 16) under one of the settings the
reference driver (``../shared/tools/official_reference/official_train.py``) also runs, and writes the validation
loss (nats/byte) of each trained run at 1, 2, 4 and 8 descent steps as JSON:

    python scripts/parity.py --setting quickstart --seed 0 --descent-space probabilities --out qs_p_s0.json
    python scripts/parity.py --setting system1 --seed 1 --descent-space logits --runs ebt --out s1_l_s1.json
    python scripts/parity.py --setting system1_time_token --seed 0 --out tt_s0.json
    python scripts/parity.py --setting quickstart --steps 1000 --seed 0 --out long_s0.json

Settings (bindings on top of the quickstart recipe, each the reference driver's flags of the same name):
``quickstart`` (none), ``system1`` (the paper's System 1 hyperparameters at 4xs: learning rate 0.0024, step size
500 learnable at 1500x, initial noise 1, no label smoothing), ``system1_time_token`` (``system1`` with the
time-token step conditioning). ``--bind`` adds any other binding.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import gin

from energyflow.configurables import parse_recipe

SYSTEM1 = ["Trainer.learning_rate = 0.0024", "GradientDescent.step_size = 500.0",
           "EBTLanguageModelTask.step_size_lr_multiplier = 1500.0", "RandomNoise.scale = 1.0",
           "EBTObjective.label_smoothing = None"]
SETTINGS = {
    "quickstart": [],
    "system1": SYSTEM1,
    "system1_time_token": SYSTEM1 + ["EBT.step_conditioning = 'time_token'", "EBT.num_step_embeddings = 2"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--descent-space", choices=("probabilities", "logits"), default="probabilities")
    parser.add_argument("--runs", default="baseline,ebt", help="comma-separated: baseline, ebt")
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    runs = [name for name in args.runs.split(",") if name]
    with tempfile.TemporaryDirectory() as work:
        bindings = [f"OUT_DIR = '{work}'", "Trainer.progress = False", f"Trainer.seed = {args.seed}",
                    f"NUM_STEPS = {args.steps}", f"Trainer.checkpoint_every = {args.steps}",
                    f"Trainer.num_threads = {args.threads}", f"DESCENT_SPACE = '{args.descent_space}'",
                    f"compare.runs = {runs!r}", *SETTINGS[args.setting], *args.bind]
        gin.clear_config()
        parse_recipe("experiments/quickstart.gin", bindings)
        start = time.perf_counter()
        results = gin.get_configurable("launch")()
        seconds = time.perf_counter() - start
        gin.clear_config()
    report = {"setting": args.setting, "seed": args.seed, "steps": args.steps, "descent_space": args.descent_space,
              "bindings": SETTINGS[args.setting] + args.bind, "seconds": round(seconds, 1),
              "validation": {name: {str(k): v["loss"] for k, v in by_steps.items()}
                             for name, by_steps in results.items()}}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("RESULT", json.dumps(report["validation"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
