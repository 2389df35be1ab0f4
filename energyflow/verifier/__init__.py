"""Energy as a verifier: score and rank candidates, per-token uncertainty (terminal and HTML),
out-of-distribution detection (AUROC) and calibration of energy against loss (Spearman).
"""
from energyflow.verifier.metrics import auroc, average_ranks, spearman
from energyflow.verifier.render import TokenValues, byte_pieces, to_html, to_rich, write_html
from energyflow.verifier.scoring import ContinuationScores, observed_state, score_continuations, token_energies

__all__ = [
    "ContinuationScores", "TokenValues", "auroc", "average_ranks", "byte_pieces", "observed_state",
    "score_continuations", "spearman", "to_html", "to_rich", "token_energies", "write_html",
]
