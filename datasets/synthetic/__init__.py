"""The built-in landmark-retrieval benchmark: from one seed, nothing downloaded, a small dataset of procedurally
drawn landmarks written exactly as revisited Oxford/Paris are laid out, so evaluation reads it as it reads roxford5k::

    <root>/<name>/jpg/, gnd_<name>.pkl, views.csv, meta.json       database images and queries, their ground truth
    <root>/<name>_train/jpg/, train.csv, meta.json                 training views of *other* landmarks

The files, how scenes and views are drawn, the easy / hard / junk thresholds and the seeding:
docs/evaluation.md, "How the built-in benchmark is drawn".
"""
from datasets.synthetic.build import FORMAT_VERSION, build_synthetic, load_train_split
from datasets.synthetic.config import SyntheticConfig
from datasets.synthetic.draw import draw_landmark_scene, draw_unrelated_scene
from datasets.synthetic.views import (
    ViewParams,
    draw_occluders,
    label_view,
    landmark_bbox,
    render_view,
    sample_view,
    view_homography,
    view_size,
    visible_fraction,
)

__all__ = [
    "FORMAT_VERSION", "SyntheticConfig", "ViewParams", "build_synthetic", "draw_landmark_scene", "draw_occluders",
    "draw_unrelated_scene", "label_view", "landmark_bbox", "load_train_split", "render_view", "sample_view",
    "view_homography", "view_size", "visible_fraction",
]
