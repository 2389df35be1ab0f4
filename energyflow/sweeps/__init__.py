"""Sweeps: trial specs as plain strings (``spec``), one trial's run and record (``trial``), the local and Ray
engines (``runner``) and the report over seeds (``report``); ``energyflow sweep`` and ``energyflow report``
(``commands``). See docs/sweeps.md."""
from energyflow.sweeps.report import aggregate, load_sweep, write_report
from energyflow.sweeps.runner import ENGINES, SweepOutcome, run_sweep
from energyflow.sweeps.spec import Axis, SweepError, Trial, expand, load_sweep_file, parse_axis, parse_seeds, sweep
from energyflow.sweeps.trial import is_done, read_record, run_trial

__all__ = ["Axis", "ENGINES", "SweepError", "SweepOutcome", "Trial", "aggregate", "expand", "is_done", "load_sweep",
           "load_sweep_file", "parse_axis", "parse_seeds", "read_record", "run_sweep", "run_trial", "sweep",
           "write_report"]
