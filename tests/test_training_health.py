"""Flags on training runs that look collapsed or at chance (writer_retrieval.training_health)."""
import math

import pandas as pd

from writer_retrieval.training_health import flags, health_table


def attmask_log(teacher_entropy: float, feature_std: float = 0.1, losses=(8.0, 7.0)) -> pd.DataFrame:
    n = len(losses)
    return pd.DataFrame({"epoch": range(1, n + 1), "loss": losses, "uniform_entropy_cls": [math.log(256)] * n,
                         "teacher_entropy_cls": [teacher_entropy] * n, "uniform_entropy_patch": [math.log(256)] * n,
                         "teacher_entropy_patch": [3.0] * n, "feature_std": [feature_std] * n,
                         "spread_feature_std": [192 ** -0.5] * n})


def test_a_healthy_run_has_no_flag():
    assert flags(attmask_log(3.0)) == []


def test_the_demo_failure_is_flagged_near_uniform_and_rising():
    # The demo run: [CLS] loss at 5.51 ~ ln(256) = 5.55, loss rising from 7.9 to 8.3.
    found = flags(attmask_log(5.51, losses=(7.9, 8.3)))
    assert found[0].startswith("teacher cls output near uniform (entropy 5.51 of ln(out_dim) 5.55)")
    assert found[-1] == "loss rose from 7.9000 to 8.3000"


def test_collapse_onto_one_prototype_and_onto_few_directions_are_flagged():
    found = flags(attmask_log(0.01, feature_std=0.001))
    assert any("collapsed onto one prototype" in f for f in found)
    assert any(f.startswith("dimensional collapse") for f in found)


def test_a_pretext_task_at_chance_and_a_saghog_run_at_its_baseline_are_flagged():
    pretext = pd.DataFrame({"epoch": [1, 2], "loss": [3.2, 3.1], "accuracy": [0.04, 0.05], "chance": [1 / 24] * 2})
    assert flags(pretext) == ["accuracy 0.050 at chance (0.042): the pretext task is not learnt"]
    saghog = pd.DataFrame({"epoch": [1, 2], "loss": [0.06, 0.051], "loss_mean_hog": [0.04, 0.038]})
    assert flags(saghog) == ["masked-HOG loss 0.0510 not below the mean-HOG baseline 0.0380: the encoder predicts "
                             "no better than the average patch"]
    learnt = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.4], "accuracy": [0.4, 0.9], "chance": [1 / 3] * 2})
    assert flags(learnt) == []


def test_health_table_has_one_row_per_run_with_its_flags(tmp_path):
    attmask_log(5.51).to_parquet(tmp_path / "a.parquet")
    attmask_log(3.0).to_parquet(tmp_path / "b.parquet")
    table = health_table({"demo/attmask-1": str(tmp_path / "a.parquet"), "demo/attmask-2": str(tmp_path / "b.parquet")})
    assert list(table.run) == ["demo/attmask-1", "demo/attmask-2"] and list(table.epochs) == [2, 2]
    assert table["flags"][0].startswith("teacher cls output near uniform") and table["flags"][1] == "none"
