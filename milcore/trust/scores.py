"""The names of the uncertainty scores and their defaults, importable without numpy (the CLI reads them).

What each score is: :mod:`milcore.trust.uncertainty`.
"""

#: The uncertainty scores, in the order reports list them.
SCORES = ("entropy", "least_confidence", "disagreement", "mc_dropout")
#: The score ``--abstain-above`` thresholds unless told otherwise.
DEFAULT_SCORE = "entropy"
#: Monte-Carlo dropout passes per model (where a model has dropout).
MC_SAMPLES = 10
