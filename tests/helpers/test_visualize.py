"""The one ranking grid: frames in the label colours, tile count and layout, a legend of the labels shown,
scores with enough digits to tell neighbours apart, names fitted to the tile; labels under the Medium protocol."""

import cv2
import numpy as np
import pytest

from helpers.visualize import (
    BACKGROUND,
    FRAME_COLORS,
    GROUND_TRUTH_LEGEND,
    Tile,
    _layout,
    fit_text,
    format_scores,
    ranking_grid,
    result_labels,
    save_ranking_grid,
    score_decimals,
)


def _runs(row: np.ndarray) -> list[tuple[int, int, int]]:
    """The colours of the runs of frame-coloured pixels along one image row, left to right."""
    colours = {c: lab for lab, c in FRAME_COLORS.items()}
    out, prev = [], None
    for px in map(tuple, row):
        cur = px if px in colours else None
        if cur is not None and cur != prev:
            out.append(cur)
        prev = cur
    return out


def _hits(labels, scores=None):
    scores = scores or [0.9 - 0.1 * k for k in range(len(labels))]
    return [Tile(np.full((30, 40, 3), 60 + 20 * k, np.uint8), label=lab, rank=k + 1, score=s, name=f"img{k}.jpg")
            for k, (lab, s) in enumerate(zip(labels, scores))]


def test_grid_frames_tiles_in_order_with_a_legend_of_the_labels_shown(tmp_path):
    labels = ["positive", "negative", "junk"]
    path = save_ranking_grid(tmp_path / "g" / "q.png", query=np.full((40, 30, 3), 128, np.uint8),
                             hits=_hits(labels), tile=40, title="toy")
    grid = cv2.imread(str(path))
    lay = _layout(40)
    legend_h = lay.line + 8
    body = grid[legend_h:]
    assert body.shape[0] > lay.box_h + 2 * lay.border  # captions under the thumbnails
    # the top frame row of the tiles: query, then the results in rank order, one frame each
    assert _runs(body[1]) == [FRAME_COLORS[k] for k in ["query", *labels]]
    # the legend: a swatch (a filled square) of each label shown, and none of a label absent
    swatch = (lay.line - 6) ** 2

    def swatches(image):
        pixels = [tuple(px) for px in image[:legend_h].reshape(-1, 3)]
        return {lab for lab, c in FRAME_COLORS.items() if pixels.count(c) >= swatch}

    assert swatches(grid) == {"query", *labels}
    only_positive = ranking_grid(query=None, hits=_hits(["positive"]), tile=40)
    assert swatches(only_positive) == {"query", "positive"}
    listed = ranking_grid(query=None, hits=_hits(["positive"]), tile=40, legend=GROUND_TRUTH_LEGEND)
    assert swatches(listed) == set(GROUND_TRUTH_LEGEND)
    # a thumbnail's pixels inside its frame, centred in its box
    x0 = body[1].tolist().index(list(FRAME_COLORS["positive"]))
    assert tuple(body[lay.border + lay.box_h // 2, x0 + lay.tile_w // 2]) == (60, 60, 60)


def test_grid_wraps_into_rows_and_shows_unlabelled_results():
    hits = [Tile(np.zeros((20, 20, 3), np.uint8), rank=k + 1, score=1.0 - k / 10) for k in range(7)]
    hits[2] = Tile(None, rank=3, score=0.8)  # an unreadable file: a placeholder, not an error
    lay = _layout(48)
    grid = ranking_grid(query=np.zeros((20, 20, 3), np.uint8), hits=hits, tile=48, cols=3, legend=False)
    gap = max(6, lay.border * 2)
    assert grid.shape == (3 * (lay.tile_h + gap), gap + 3 * (lay.tile_w + gap), 3)
    assert _runs(grid[1]) == [FRAME_COLORS["query"]] + 2 * [FRAME_COLORS["result"]]
    assert tuple(grid[0, 0]) == BACKGROUND


def test_scores_get_enough_digits_to_tell_neighbours_apart():
    assert score_decimals([0.91, 0.5]) == 4
    assert score_decimals([0.81231, 0.81234, 0.7]) == 5  # 0.8123 twice at 4 digits
    assert score_decimals([0.5, 0.5]) == 4  # equal scores: no number of digits tells them apart
    assert score_decimals([0.1234567811, 0.1234567819]) == 8  # capped
    assert format_scores([0.81231, 0.81234, None, float("nan")]) == ["0.81231", "0.81234", "", ""]
    assert format_scores([0.5, 0.25]) == ["0.5000", "0.2500"]


def test_names_are_shortened_in_the_middle_to_fit():
    long = "all_souls_000013_a_very_long_name.jpg"
    short = fit_text(long, 80, 0.4)
    assert short != long and ".." in short and short.startswith("all") and short.endswith("g")
    assert cv2.getTextSize(short, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] <= 80
    assert fit_text("a.jpg", 80, 0.4) == "a.jpg"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown label"):
        ranking_grid(query=None, hits=[Tile(None, label="maybe")])
    with pytest.raises(ValueError, match="uint8"):
        ranking_grid(query=np.zeros((4, 4), np.float32), hits=[])


def test_result_labels_use_the_medium_protocol():
    gnd = {"easy": [3], "hard": [7], "junk": [5]}
    assert result_labels(np.array([7, 5, 1, 3, 0]), gnd, top=4) == ["positive", "junk", "negative", "positive"]
