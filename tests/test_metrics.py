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


def test_matrix_heatmap_labels_every_cell_and_both_axes():
    from clsim.report import figure_rgb, heatmap_figure
    for scale, R in ((100.0, [[91.0, 0.0], [40.0, 88.5]]), (1.0, [[0.75, 0.0], [0.25, 1.0]])):
        fig = heatmap_figure(R, scale)
        ax = fig.axes[0]
        texts = sorted(t.get_text() for t in ax.texts)
        expected = [f"{x:.0f}" if scale > 1 else f"{x:.2f}" for row in R for x in row]
        assert texts == sorted(expected)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("evaluated on task", "after training task")
        colorbar = fig.axes[1]
        assert colorbar.get_ylim() == (0.0, scale)      # the colour scale spans 0 to a perfect score
        img = figure_rgb(fig)
        assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 150 and img.std() > 10
