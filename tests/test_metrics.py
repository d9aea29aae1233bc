"""Metric formulas on a hand-made matrix (metrics.md)."""
import pytest
import torch

from clsim import metrics

# R[i][j]: score on task j after training task i; b: initial scores.
R = [[90.0, 10.0, 20.0],
     [60.0, 80.0, 30.0],
     [50.0, 70.0, 95.0]]
B = [11.0, 12.0, 13.0]


def test_acc_is_mean_over_seen_tasks():
    assert metrics.acc(R, 0) == 90.0
    assert metrics.acc(R, 1) == 70.0
    assert metrics.acc(R, 2) == pytest.approx((50 + 70 + 95) / 3)


def test_bwt_compares_final_with_just_learned():
    assert metrics.bwt(R, 0) == 0.0
    assert metrics.bwt(R, 1) == -30.0
    assert metrics.bwt(R, 2) == pytest.approx(((50 - 90) + (70 - 80)) / 2)


def test_fwt_compares_before_training_with_initial_model():
    # j=1: R[0][1] - b[1] = 10 - 12; j=2: R[1][2] - b[2] = 30 - 13
    assert metrics.fwt(R, B, 2) == pytest.approx(((10 - 12) + (30 - 13)) / 2)


def test_forgetting_uses_best_earlier_score():
    # after task 2: task 0 best earlier 90 -> 50 (40); task 1 best earlier 80 -> 70 (10)
    assert metrics.forgetting(R, 2) == pytest.approx(25.0)
    assert metrics.forgetting(R, 1) == pytest.approx(30.0)
    # the best earlier score need not be the score just after learning the task
    assert metrics.forgetting([[10.0, 0.0, 0.0], [40.0, 5.0, 0.0], [20.0, 5.0, 7.0]], 2) == pytest.approx((20 + 0) / 2)


def test_summary_is_the_last_row():
    s = metrics.summary(R, B)
    assert s == {"acc": metrics.acc(R, 2), "bwt": metrics.bwt(R, 2), "fwt": metrics.fwt(R, B, 2),
                 "forgetting": metrics.forgetting(R, 2)}


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, dtype=torch.float32)
    b = torch.zeros(3, dtype=torch.uint8)
    assert metrics.tensor_bytes([a, b]) == 43
    assert metrics.tensor_bytes([a, a]) == 40


def test_matrix_image_shades_scores_relative_to_a_perfect_score():
    from clsim.loggers import matrix_image
    for scale in (100.0, 1.0):                         # accuracy in %, normalised RL return
        img = matrix_image([[scale, 0.0, scale / 2]], scale, cell=4)
        centre = img[2, 2::4].astype(int)               # the middle pixel row of each cell
        assert centre[0].tolist() == [7, 48, 107]       # full score: the darkest blue
        assert centre[1].tolist() == [255, 255, 255]    # zero: white
        assert (centre[2] < 255).all() and (centre[2] > centre[0]).all()
