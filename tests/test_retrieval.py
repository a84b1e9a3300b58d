import math

import numpy as np
import pandas as pd
import pytest

from writer_retrieval.metrics import evaluate, expected_random_ap

S = np.float32(1 / math.sqrt(2))
# Six documents whose pairwise scores tie exactly (the same products in the same order):
#   d0 = e1 (A), d1 = (s, s, 0) (B), d2 = (s, 0, s) (A), d3 = e1 (B, an exact duplicate of d0),
#   d4 = e2 (C, the writer's only document), d5 = e3 (A)
X = np.array([[1, 0, 0], [S, S, 0], [S, 0, S], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
WRITERS = np.array(["A", "B", "A", "B", "C", "A"])
PAGES = np.array(["A1", "B1", "A1", "B2", "C1", "A2"])
IDS = np.array([f"d{i}" for i in range(6)])


def test_map_by_hand_with_ties_duplicates_and_a_singleton():
    metrics, rankings = evaluate(X, WRITERS, doc_ids=IDS, top_k=3)
    # Rankings (ties broken by document order) and AP of each query:
    #   d0: d3 d1 d2 d4 d5 -> hits at 3, 5  -> (1/3 + 2/5) / 2 = 0.366667
    #   d1: d0 d3 d4 d2 d5 -> hit at 2      -> 1/2
    #   d2: d0 d3 d5 d1 d4 -> hits at 1, 3  -> (1 + 2/3) / 2 = 0.833333
    #   d3: d0 d1 d2 d4 d5 -> hit at 2      -> 1/2   (its duplicate d0 ranks first; d3 is excluded by index)
    #   d4: writer C has no other document  -> not scored, stays a distractor
    #   d5: d2 d0 d1 d3 d4 -> hits at 1, 2  -> 1
    assert metrics["n_docs"] == 6 and metrics["n_queries"] == 5 and metrics["n_skipped_queries"] == 1
    assert metrics["map"] == pytest.approx((11 / 30 + 0.5 + 5 / 6 + 0.5 + 1) / 5)  # 0.64
    assert metrics["top1"] == pytest.approx(2 / 5)
    assert metrics["p_at_5"] == pytest.approx((2 + 1 + 2 + 1 + 2) / 5 / 5)
    assert metrics["p_at_10"] == pytest.approx((2 + 1 + 2 + 1 + 2) / 10 / 5)
    q0 = rankings[rankings.query_doc_id == "d0"]
    assert list(q0.doc_id) == ["d3", "d1", "d2"] and list(q0["rank"]) == [1, 2, 3]
    assert list(q0.relevant) == [False, False, True]
    assert list(rankings[rankings.query_doc_id == "d3"].doc_id) == ["d0", "d1", "d2"]
    assert (rankings.query_doc_id != rankings.doc_id).all()
    # d1's scores tie three ways at s (d0, d3, d4): a top-2 cut keeps the first two by document order.
    _, top2 = evaluate(X, WRITERS, doc_ids=IDS, top_k=2)
    assert list(top2[top2.query_doc_id == "d1"].doc_id) == ["d0", "d3"]
    # The singleton still appears as a distractor in others' rankings, and has its own ranking.
    assert "d4" in set(rankings.doc_id) and len(rankings[rankings.query_doc_id == "d4"]) == 3


def test_exclude_same_page_removes_the_querys_page_from_its_gallery():
    metrics, rankings = evaluate(X, WRITERS, PAGES, exclude_same="page", doc_ids=IDS)
    # d0 loses d2 (same page A1): d3 d1 d4 d5 -> hit at 4 -> 1/4
    # d2 loses d0: d3 d5 d1 d4 -> hit at 2 -> 1/2 ; the others keep their galleries.
    assert metrics["n_queries"] == 5
    assert metrics["map"] == pytest.approx((0.25 + 0.5 + 0.5 + 0.5 + 1) / 5)
    same_page = rankings.merge(pd.DataFrame({"query_doc_id": IDS, "qpage": PAGES})).merge(
        pd.DataFrame({"doc_id": IDS, "page": PAGES}))
    assert (same_page.qpage != same_page.page).all()


def test_a_writer_whose_other_documents_share_the_querys_page_is_skipped():
    x = np.eye(3, dtype=np.float32)
    metrics, _ = evaluate(x, ["D", "D", "E"], ["p", "p", "q"], exclude_same="page")
    assert metrics["n_queries"] == 0 and metrics["n_skipped_queries"] == 3 and math.isnan(metrics["map"])


def test_perfect_and_blocked_evaluation_agree():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 16))
    writers = np.repeat(np.arange(7), 4)
    x = centres[writers] + 0.05 * rng.normal(size=(28, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    whole, r1 = evaluate(x, writers, block=1000)
    blocked, r2 = evaluate(x, writers, block=5)
    assert whole == blocked and r1.equals(r2)
    assert whole["map"] == 1.0 and whole["top1"] == 1.0 and whole["p_at_5"] == pytest.approx(3 / 5)


def test_expected_random_ap_by_hand():
    assert expected_random_ap(1, 2) == pytest.approx(0.75)  # (1 + 1/2) / 2
    # R = 2 of G = 3: the irrelevant item at rank 1, 2 or 3 -> AP 7/12, 5/6, 1
    assert expected_random_ap(2, 3) == pytest.approx((7 / 12 + 5 / 6 + 1) / 3)
    assert expected_random_ap(5, 5) == pytest.approx(1.0)
    # Monte Carlo agrees for a larger case.
    rng = np.random.default_rng(1)
    sims = []
    for _ in range(4000):
        rel = np.zeros(30, bool)
        rel[rng.choice(30, 4, replace=False)] = True
        hits = np.flatnonzero(rel) + 1
        sims.append(np.mean(np.arange(1, 5) / hits))
    assert expected_random_ap(4, 30) == pytest.approx(np.mean(sims), abs=0.01)
