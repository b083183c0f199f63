"""The built-in landmark-retrieval benchmark: procedurally drawn landmarks, written in the revisitop layout.

Nothing is downloaded. From one seed this package draws a small landmark-retrieval dataset and writes it exactly
as revisited Oxford/Paris are laid out, so that evaluation reads it through the same code path as roxford5k::

    <root>/<name>/jpg/<image>.jpg          database images and queries (BGR JPEGs, as OpenCV reads them)
    <root>/<name>/gnd_<name>.pkl           {'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}, ...]}
    <root>/<name>/views.csv                the view parameters every test image was drawn with, and its label
    <root>/<name>/meta.json                generator, format version and the full SyntheticConfig
    <root>/<name>_train/jpg/<image>.jpg    training views of *other* landmarks
    <root>/<name>_train/train.csv          columns ``image,label``
    <root>/<name>_train/meta.json

How it is drawn. Each landmark is a scene on a canvas larger than the images (sky, hills, ground, trees and one
building-like structure: textured facade, window grid, towers, arches, rose windows, a clock, a panel holding a
random binary code). Every image is a view of a scene through a homography (scale, shift, in-plane rotation and
keystone "tilt"), then occluders, lighting/contrast/colour changes, blur and noise. Distractors are views of
unrelated scenes (other buildings, landscapes, abstract textures).

Labels. They are decided from what was drawn, never by hand. ``visible`` is the fraction of the landmark's
pixels (on the canvas) that end up inside the view and not behind an occluder. A database view is

* **junk** when ``visible < junk_max_visible`` (default 0.25): the landmark is barely in the picture;
* **easy** when ``visible >= easy_min_visible`` (0.7) *and* the viewpoint change is small: ``|tilt| <=
  easy_max_tilt`` (0.12, the keystone of either axis), ``|rotation| <= easy_max_rotation`` (8 degrees) and
  ``max(scale, 1/scale) <= easy_max_zoom`` (1.4, scale 1 being the canonical framing in which the landmark
  spans 75% of the frame);
* **hard** otherwise (strong tilt, rotation, zoom in or out, heavy occlusion, low overlap).

Labels are per image (as in revisitop), so every query of a landmark gets the same easy/hard/junk lists, and
every image of another landmark or distractor is a negative. The first database view of every landmark is drawn
until it is easy and the second until it is hard, so every query has positives of both kinds.
Queries are gentle, unoccluded views showing the whole landmark; their ``bbx`` is the box of the landmark's
outline in the query image (float pixels, ``[x1, y1, x2, y2]``).
The database order is shuffled (seeded), so an index carries no hint of its landmark.

Every random draw comes from a ``numpy.random.Generator`` seeded by ``SeedSequence(seed, spawn_key=...)`` with a
key naming the image, so the same seed gives the same bytes and the images of one landmark do not depend on
how many distractors were asked for.
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
