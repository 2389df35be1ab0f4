"""energyflow: energy-based modeling in PyTorch — EBT composition, objectives, one trainer, gin recipes, CLI.

Import what you need from the submodules (``energyflow.trainer``, ``energyflow.tasks``, ``energyflow.data``);
gin registration lives in ``energyflow.configurables`` and happens only when that module is imported.
"""
