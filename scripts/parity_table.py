"""The parity table of docs/fidelity.md from a folder of result files.

Reads ``ref_<setting>_<ebt|tf>_s<seed>.json`` (written by the reference driver,
``../shared/tools/official_reference/official_train.py --out``) and ``ef_<setting>_<p|l>_s<seed>.json``
(written by ``scripts/parity.py --out``; ``p``: the probability-space rule, ``l``: the logit-space rule) and
prints one markdown table: per setting and implementation, the validation loss (nats/byte) of each seed and
their mean, for the Transformer++ and the EBT at 1, 2, 4 and 8 descent steps.

    python scripts/parity_table.py RESULTS_DIR > table.md
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

SETTINGS = {"qs": "quickstart, 150 steps", "s1": "paper System 1 hyperparameters, 150 steps",
            "s1tt": "System 1 + time token, 150 steps", "long": "quickstart, 1000 steps"}
IMPLEMENTATIONS = {"ref": "reference code", "p": "energyflow, `probabilities`", "l": "energyflow, `logits`"}
COLUMNS = ["Transformer++", "1", "2", "4", "8"]
PATTERN = re.compile(r"(ref|ef)_(qs|s1tt|s1|long)_(ebt|tf|p|l)_s(\d+)\.json")


def collect(folder: Path) -> dict:
    """{(setting, implementation): {column: {seed: loss}}}."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(folder.glob("*.json")):
        match = PATTERN.fullmatch(path.name)
        if not match:
            continue
        side, setting, kind, seed = match.groups()
        validation = json.loads(path.read_text())["validation"]
        implementation = "ref" if side == "ref" else kind
        if side == "ref":
            runs = {"tf": {"Transformer++": validation.get("-")}} if kind == "tf" else {"ebt": validation}
        else:
            runs = {"ebt": validation.get("ebt", {}), "tf": {"Transformer++": validation.get("baseline", {}).get("None")}}
        for name, values in runs.items():
            for column, loss in values.items():
                if loss is not None and column in COLUMNS:
                    table[(setting, implementation)][column][int(seed)] = loss
    return table


def cell(by_seed: dict) -> str:
    if not by_seed:
        return "-"
    values = [by_seed[s] for s in sorted(by_seed)]
    mean = sum(values) / len(values)
    return f"**{mean:.3f}** ({' / '.join(f'{v:.3f}' for v in values)})"


def markdown(table: dict) -> str:
    lines = ["| setting | implementation | seeds | Transformer++ | EBT 1 step | EBT 2 steps | EBT 4 steps | EBT 8 steps |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, label in SETTINGS.items():
        for implementation, name in IMPLEMENTATIONS.items():
            row = table.get((setting, implementation))
            if not row:
                continue
            seeds = sorted({seed for by_seed in row.values() for seed in by_seed})
            lines.append(f"| {label} | {name} | {', '.join(map(str, seeds))} | "
                         + " | ".join(cell(row.get(column, {})) for column in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/parity_table.py RESULTS_DIR", file=sys.stderr)
        return 2
    print(markdown(collect(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
