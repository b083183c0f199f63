"""Result grids: frame colours per ground-truth label, and labels under the Medium protocol."""
import cv2
import numpy as np

from helpers.visualize import FRAME_COLORS, result_labels, save_result_grid


def test_result_grid_frames_have_the_label_colours(tmp_path):
    query = np.full((40, 30, 3), 128, np.uint8)
    results = [np.full((20, 40, 3), v, np.uint8) for v in (50, 100, 150)]
    labels = ["positive", "negative", "junk"]
    path = save_result_grid(tmp_path / "g" / "q.png", query=query, results=results, labels=labels, height=40,
                            border=4, gap=5)
    grid = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert grid.shape[0] == 40 and grid.dtype == np.uint8
    # tiles: query 30 px wide at inner height 32 -> 24 + 8; results 40x20 -> 64 + 8; gaps 10 after the query, then 5
    starts = [0, 32 + 10, 32 + 10 + 72 + 5, 32 + 10 + 2 * (72 + 5)]
    assert grid.shape[1] == starts[-1] + 72
    for x0, label in zip(starts, ["query", *labels]):
        assert tuple(grid[1, x0 + 1]) == FRAME_COLORS[label]  # inside the top frame
        assert tuple(grid[20, x0 + 2]) == FRAME_COLORS[label]  # left frame, mid height
    assert tuple(grid[20, starts[1] + 20]) == (50, 50, 50)  # the first result's pixels inside its frame


def test_result_labels_use_the_medium_protocol():
    gnd = {"easy": [3], "hard": [7], "junk": [5]}
    assert result_labels(np.array([7, 5, 1, 3, 0]), gnd, top=4) == ["positive", "junk", "negative", "positive"]

