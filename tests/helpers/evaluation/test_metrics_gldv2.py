"""GLDv2 challenge metrics (helpers.evaluation.metrics): mAP@100 for retrieval and GAP for recognition, on small cases
worked out by hand."""
import pytest

from helpers.evaluation.metrics import gldv2_global_average_precision, gldv2_mean_average_precision


def test_retrieval_map_by_hand():
    solution = {"q1": ["a", "b"], "q2": ["c"], "q3": ["d", "e", "f"]}
    predictions = {
        "q1": ["a", "x", "b"],            # AP = (1/1 + 2/3) / 2
        "q2": ["x", "c", "c"],            # AP = (1/2) / 1; the repeated c counts once
        # q3 not predicted: AP 0, still counted in the mean
    }
    want = ((1 + 2 / 3) / 2 + 0.5 + 0.0) / 3
    assert gldv2_mean_average_precision(predictions, solution) == pytest.approx(want)


def test_retrieval_map_cut_at_max_predictions_and_duplicates_keep_their_position():
    solution = {"q": ["a", "b", "c"]}
    # cut at 2: only x, a are read; AP = (1/2) / min(3, 2)
    assert gldv2_mean_average_precision({"q": ["x", "a", "b"]}, solution, max_predictions=2) == pytest.approx(0.25)
    # a duplicate still takes a position: b is at position 3, AP = (1/1 + 2/3) / 3
    assert gldv2_mean_average_precision({"q": ["a", "a", "b"]}, solution) == pytest.approx((1 + 2 / 3) / 3)


def test_retrieval_errors():
    with pytest.raises(ValueError, match="'zz' is not part of the retrieval solution"):
        gldv2_mean_average_precision({"zz": ["a"]}, {"q": ["a"]})
    with pytest.raises(ValueError, match="empty"):
        gldv2_mean_average_precision({}, {})


def test_a_test_image_with_an_empty_solution_is_refused_naming_it():
    """Issue 19 (semantic gap): an empty solution list was silently scored as AP 0; the challenge's code cannot
    score it at all. Predicted or not, such a test image is malformed input, and named."""
    solution = {"q1": ["a"], "q2": [], "q3": ["c"]}
    for predictions in ({"q1": ["a"], "q2": ["b"]}, {"q1": ["a"]}):
        with pytest.raises(ValueError, match=r"test image 'q2' has an empty retrieval solution .*1 such"):
            gldv2_mean_average_precision(predictions, solution)


def test_gap_by_hand():
    solution = {"t1": [5], "t2": [7, 8], "t3": [], "t4": [1]}
    predictions = {
        "t1": {"class": 5, "score": 0.9},   # rank 1, correct: 1/1
        "t3": {"class": 2, "score": 0.8},   # rank 2, wrong (non-landmark image)
        "t2": {"class": 8, "score": 0.7},   # rank 3, correct: 2/3
        "t4": {"class": 3, "score": 0.1},   # rank 4, wrong
    }
    assert gldv2_global_average_precision(predictions, solution) == pytest.approx((1 + 2 / 3) / 3)
    # skipping images without ground truth removes t3's penalty: t2 is then rank 2
    assert gldv2_global_average_precision(predictions, solution, ignore_non_gt_test_images=True) == \
        pytest.approx((1 + 2 / 2) / 3)


def test_gap_ties_break_by_test_id_then_class():
    solution = {"a": [1], "b": [2]}
    predictions = {"b": {"class": 2, "score": 0.5}, "a": {"class": 9, "score": 0.5}}
    # equal scores: "a" (wrong) comes first, then "b" (correct) at rank 2 -> (1/2) / 2
    assert gldv2_global_average_precision(predictions, solution) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no test image with ground truth"):
        gldv2_global_average_precision(predictions, {"a": [], "b": []})
