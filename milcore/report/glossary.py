"""One-line explanations of the terms every report uses, written once and shared by all reports."""

from __future__ import annotations

from collections.abc import Sequence

from milcore.report.document import Report

#: Term -> one line a reader without a statistics background can follow.
GLOSSARY: dict[str, str] = {
    "balanced accuracy": "the mean, over classes, of the share of each class's patients predicted correctly; "
    "chance is 1 / (number of classes) whatever the class sizes.",
    "macro-F1": "the mean, over classes, of F1 (the harmonic mean of precision and recall of that class).",
    "AUROC": "the probability that a patient of a class gets a higher score for that class than a patient of "
    "another class (one vs rest, averaged over classes); 0.5 is chance, 1 is perfect ranking.",
    "ECE": "expected calibration error: the average gap between the predicted confidence and the observed "
    "accuracy over confidence bins; 0 is perfectly calibrated. A low ECE says nothing about accuracy: "
    "probabilities of 1/C for everyone are calibrated and useless.",
    "T": "temperature: the logits are divided by T before the softmax, fitted on the validation fold to "
    "calibrate the probabilities (T > 1 softens, T < 1 sharpens). A T at the edge of its search range "
    "(0.05 or 20) means calibration failed.",
    "pooled out-of-fold": "every patient is predicted once, by the fold model that never saw it in training; "
    "the metrics are computed on all these predictions together.",
    "chance": "what a model that ignores the smear would score: balanced accuracy 1 / (number of classes), "
    "AUROC 0.5.",
    "CI": "95% confidence interval: the range of values compatible with this cohort; a wide interval means "
    "too few patients to pin the value down.",
    "bootstrap": "resampling the patients with replacement many times and recomputing the metric; the middle "
    "95% of the resampled values gives the CI.",
    "permutation test": "a p-value from shuffling group membership many times: how often a gap this large "
    "appears when groups do not matter.",
    "minimum detectable effect": "MDE: the smallest gap a test finds 80% of the time at its family's alpha, at "
    "this cohort's group sizes and class mix (from the spread of the test's own permutations). A group that is "
    "not flagged may still be worse by less than its MDE: 'not flagged' is not 'fair'.",
    "log-odds": "the log of p / (1 - p), p the probability the model gave the patient's true class (0: even odds, "
    "higher: surer and right; clipped at +-8); class-balanced like balanced accuracy.",
    "log-loss": "minus the log of the probability the model gave the patient's true class (0: certain and right); "
    "class-balanced: averaged within each class, then over classes, like balanced accuracy.",
    "Brier score": "the squared distance between the predicted probabilities and the true class, halved so it "
    "runs from 0 (certain and right) to 1 (certain and wrong); class-balanced like the log-loss.",
    "Holm": "Holm's step-down correction of p-values for many tests, keeping the chance of any false flag "
    "in a family of tests at alpha.",
    "Westfall-Young": "a step-down correction that shuffles group membership once for all the tests of a family "
    "and compares each p-value with the smallest one the shuffles produce: the chance of any false flag stays at "
    "alpha, and tests that move together (overlapping groups) are not counted twice.",
    "Bonferroni": "a correction multiplying each p-value by the number of tests, keeping the chance of any "
    "false flag at alpha (stricter than Holm).",
    "BH": "Benjamini-Hochberg: a correction keeping the expected share of false flags among the flagged "
    "results at alpha (less strict than Holm).",
    "equalized odds": "equalized-odds difference: the largest difference between groups in the true-positive "
    "or false-positive rate of a class; 0 means the errors fall equally on every group.",
    "demographic parity": "demographic-parity difference: the largest difference between groups in how "
    "often a class is predicted; 0 means every group receives each diagnosis at the same rate.",
    "forgetting": "the mean drop of a task's accuracy from its best value to its value after the last task.",
    "BWT": "backward transfer: how training on later tasks changed the accuracy on earlier ones "
    "(negative: forgetting).",
    "FWT": "forward transfer: accuracy on a task before it is trained, relative to an untrained model.",
    "t-interval": "the 95% interval of a mean over seeds from Student's t distribution: it reflects re-training "
    "noise on one fixed test set, not the uncertainty of that test set.",
    "trend": "the slope of a least-squares line of a test metric against the training set's female fraction, "
    "with its p-value.",
    "instance-AUROC": "how well the per-cell attention ranks the known diagnostic cells above the others "
    "(0.5: no better than random).",
    "uncertainty score": "how unsure the model is about a patient, from 0 (certain) to 1 (as unsure as possible): "
    "the entropy of its probabilities, 1 - its top probability, the disagreement between fold models, or the "
    "spread of MC-dropout passes.",
    "coverage": "the share of patients the model decides when the most uncertain ones are referred for review.",
    "AURC": "area under the risk-coverage curve: the error rate of the kept patients averaged over every "
    "coverage, most certain first; lower is better, and a random ranking scores the overall error rate.",
    "referred for review": "a patient whose uncertainty score is above the chosen threshold: the model abstains "
    "and a hematologist decides.",
}

#: The terms each report explains (a report may add its own).
RUN_TERMS = ("balanced accuracy", "macro-F1", "AUROC", "ECE", "T", "pooled out-of-fold", "CI", "bootstrap",
             "chance")  # fmt: skip
AUDIT_TERMS = ("balanced accuracy", "AUROC", "ECE", "CI", "bootstrap", "permutation test", "equalized odds",
               "demographic parity", "chance")  # fmt: skip
BENCH_TERMS = ("balanced accuracy", "macro-F1", "AUROC", "ECE", "T", "CI", "bootstrap", "chance")
EXPERIMENT_TERMS = ("balanced accuracy", "AUROC", "chance", "t-interval", "trend")
CONTINUAL_TERMS = ("balanced accuracy", "forgetting", "BWT", "FWT", "chance")
UNCERTAINTY_TERMS = ("uncertainty score", "coverage", "AURC", "referred for review")


def add_glossary(rep: Report, terms: Sequence[str], heading: str = "Terms used in this report") -> Report:
    """Append a heading and the one-line explanation of each of ``terms`` (in that order, no duplicates).

    Raises:
        KeyError: a term has no entry in :data:`GLOSSARY`.
    """
    terms = list(dict.fromkeys(terms))
    missing = [t for t in terms if t not in GLOSSARY]
    if missing:
        raise KeyError(f"no glossary entry for {', '.join(missing)}")
    rep.heading(heading)
    return rep.definitions([(t, GLOSSARY[t]) for t in terms])
