"""Stream metrics against hand-computed accuracy matrices."""

from __future__ import annotations

import numpy as np
import pytest

from milcore.continual.metrics import (
    accuracy_curve,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    per_class_recall,
    summarize,
    task_balanced_accuracy,
)

NAN = float("nan")
CLASS_INC = np.array([[0.9, 0.6, 0.5], [NAN, 0.8, 0.7], [NAN, NAN, 0.95]])
DOMAIN = np.array([[0.8, 0.7], [0.6, 0.9]])


def test_class_incremental_matrix():
    assert average_accuracy(CLASS_INC) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert average_forgetting(CLASS_INC) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(CLASS_INC) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert accuracy_curve(CLASS_INC) == pytest.approx([0.9, 0.7, (0.5 + 0.7 + 0.95) / 3])
    assert forward_transfer(CLASS_INC, [0.5, NAN, NAN]) is None


def test_domain_matrix_forward_transfer():
    assert forward_transfer(DOMAIN, [0.5, 0.4]) == pytest.approx(0.2)
    assert average_forgetting(DOMAIN) == pytest.approx(0.1)
    s = summarize(DOMAIN, [0.5, 0.4])
    assert s["average_accuracy"] == pytest.approx(0.8)
    assert s["accuracy_matrix"] == [[0.8, 0.7], [0.6, 0.9]]


def test_forgetting_uses_the_best_earlier_accuracy():
    r = np.array([[0.5, 0.9, 0.6], [NAN, 0.7, 0.7], [NAN, NAN, 1.0]])
    assert average_forgetting(r) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)
    assert average_forgetting(np.array([[0.7]])) == 0.0


def test_task_balanced_accuracy_counts_foreign_predictions_as_errors():
    y = np.array([2, 2, 3, 3])
    pred = np.array([2, 0, 3, 3])  # a prediction of an old class is an error
    assert task_balanced_accuracy(y, pred, (2, 3)) == pytest.approx(0.75)
    assert per_class_recall(y, pred, 4)[2:] == [0.5, 1.0]
    assert np.isnan(per_class_recall(y, pred, 4)[0])
