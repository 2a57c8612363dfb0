"""Summaries printed at the end of a run."""


def test_learning_line_reads_the_first_and_last_logged_steps():
    from alignment.report import learning_line

    curve = [{"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
             {"step": 2, "loss": 0.65},  # a step logged without rewards is not one of them
             {"step": 3, "loss": 0.5, "rewards/margins": 0.42, "rewards/accuracies": 1.0}]
    assert learning_line(curve) == ("reward margin +0.000 -> +0.420, accuracy 0.00 -> 1.00 over 2 steps "
                                    "(loss 0.6931 -> 0.5000)")
    assert learning_line(curve[:1]) is None


def test_the_cli_ends_with_how_the_last_training_moved(tmp_path):
    from alignment.store import RunStore
    from flows.cli import last_training_line

    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "self-rewarding"}, algorithm="self-rewarding")
    assert last_training_line(store) is None  # nothing trained yet
    curve = [{"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
             {"step": 2, "loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.5}]
    store.write_json(1, "metrics.json", {"train_metrics": {"curve": curve}})
    store.write_json(2, "metrics.json", {"train": {"trained": False}})  # M_3 = M_2: nothing to report
    assert last_training_line(store) == ("iteration 1: reward margin +0.000 -> +0.200, accuracy 0.00 -> 0.50 "
                                         "over 2 steps (loss 0.6931 -> 0.6000)")
