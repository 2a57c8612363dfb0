"""Summaries printed at the end of a run."""


def test_learning_line_reads_the_first_and_last_logged_steps():
    from alignment.report import learning_line

    curve = [{"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
             {"step": 2, "loss": 0.65},  # a step logged without rewards is not one of them
             {"step": 3, "loss": 0.5, "rewards/margins": 0.42, "rewards/accuracies": 1.0}]
    assert learning_line(curve) == ("reward margin +0.000 -> +0.420, accuracy 0.00 -> 1.00 over 2 steps "
                                    "(loss 0.6931 -> 0.5000)")
    assert learning_line(curve[:1]) is None
