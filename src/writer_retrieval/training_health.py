"""Whether a training run learns: flags from the health signals in its log.parquet.

AttMask logs output entropies against a uniform output (ln(out_dim)), the teacher-student KL, the
centres' norms and the spread of its backbone features; pretext tasks their accuracy against
chance; SAGHOG its masked-HOG loss against predicting the batch's mean HOG. A flag says what looks
wrong at the last epoch, in words a reader can act on."""
from __future__ import annotations

import pandas as pd

# Thresholds: a teacher within 5 % of uniform gives the student nothing to match; within 5 % of zero
# it has collapsed onto one prototype; features whose batch std is under a quarter of that of
# spread-out unit vectors have collapsed onto few directions.
NEAR_UNIFORM, NEAR_ONE_HOT, COLLAPSED_STD, ABOVE_CHANCE = 0.95, 0.05, 0.25, 0.05


def _entropy_flags(last, head: str) -> list[str]:
    uniform, teacher = last[f"uniform_entropy_{head}"], last[f"teacher_entropy_{head}"]
    if not teacher == teacher:  # NaN: no masked patch in the last epoch
        return []
    if teacher > NEAR_UNIFORM * uniform:
        return [f"teacher {head} output near uniform (entropy {teacher:.2f} of ln(out_dim) {uniform:.2f}): "
                f"nothing for the student to distil"]
    if teacher < NEAR_ONE_HOT * uniform:
        return [f"teacher {head} output collapsed onto one prototype (entropy {teacher:.3f})"]
    return []


def flags(log: pd.DataFrame) -> list[str]:
    """What looks collapsed or at chance at the last epoch of one run (empty: nothing)."""
    if log.empty:
        return ["no epoch logged"]
    first, last = log.iloc[0], log.iloc[-1]
    found = []
    if "teacher_entropy_cls" in log:
        found += _entropy_flags(last, "cls") + _entropy_flags(last, "patch")
        if last.feature_std < COLLAPSED_STD * last.spread_feature_std:
            found.append(f"dimensional collapse: backbone features hardly vary across a batch (std "
                         f"{last.feature_std:.4f}; spread-out features {last.spread_feature_std:.4f})")
    if "chance" in log and last.accuracy < last.chance + ABOVE_CHANCE:
        found.append(f"accuracy {last.accuracy:.3f} at chance ({last.chance:.3f}): the pretext task is not learnt")
    if "loss_mean_hog" in log and last.loss >= last.loss_mean_hog:
        found.append(f"masked-HOG loss {last.loss:.4f} not below the mean-HOG baseline {last.loss_mean_hog:.4f}: "
                     f"the encoder predicts no better than the average patch")
    if len(log) > 1 and last.loss > first.loss:
        found.append(f"loss rose from {first.loss:.4f} to {last.loss:.4f}")
    return found


SIGNALS = ["loss", "kl_cls", "kl_patch", "teacher_entropy_cls", "uniform_entropy_cls", "teacher_entropy_patch",
           "feature_std", "spread_feature_std", "masked_share", "accuracy", "chance", "loss_mean_hog"]


def health_table(logs: dict[str, str]) -> pd.DataFrame:
    """One row per run ({label: log.parquet}): its last-epoch signals and its flags."""
    rows = []
    for label, path in logs.items():
        log = pd.read_parquet(path)
        last = log.iloc[-1] if len(log) else pd.Series(dtype=float)
        rows.append({"run": label, "epochs": len(log), **{k: last[k] for k in SIGNALS if k in last},
                     "flags": "; ".join(flags(log)) or "none"})
    table = pd.DataFrame(rows)
    return table[[c for c in ["run", "epochs", *SIGNALS, "flags"] if c in table]]
