"""datasets.folder's class folder as an evaluation set: what is a positive, junk and a distractor, the query boxes,
the errors that name the file and line, and the revisitop layout it writes (read back by datasets.revisited)."""
import pickle

import cv2
import numpy as np
import pytest

from common.errors import InvalidValueError, MissingFileError, OutputExistsError
from datasets.folder import (
    ClassFolderSet,
    class_folder_title,
    class_images,
    list_class_folder,
    revisitop_ground_truth,
    write_revisitop,
)
from datasets.revisited import RevisitedDataset, load_ground_truth
from tests.support.class_folder import make_class_folder, write_image


@pytest.fixture
def folder(tmp_path):
    return make_class_folder(tmp_path / "shoes" / "test")


def test_listing_classes_junk_distractors_and_boxes(folder):
    assert class_images(folder / "gallery") == [
        ("eiffel/a.jpg", "eiffel"), ("eiffel/b.jpg", "eiffel"), ("eiffel/blurry.jpg", "eiffel"),
        ("loose.jpg", None), ("louvre/c.jpg", "louvre"), ("pisa/d.jpg", "pisa")]  # sorted; hidden folders skipped
    listing = list_class_folder(folder)
    assert listing.queries == [("eiffel/q1.jpg", "eiffel"), ("louvre/nested/q2.png", "louvre")]
    assert listing.classes == ["eiffel", "louvre"] and listing.junk == {"eiffel/blurry.jpg"}
    gnd = listing.ground_truth()
    # a gallery image of the query's class is positive, a listed one junk; the loose image and pisa's are negatives
    assert gnd[0]["easy"].tolist() == [0, 1] and gnd[0]["junk"].tolist() == [2] and gnd[0]["hard"].size == 0
    assert gnd[1]["easy"].tolist() == [4] and gnd[1]["junk"].size == 0
    assert [g["class"] for g in gnd] == ["eiffel", "louvre"]


def test_the_query_side_is_cropped_to_its_box_and_named_by_class(folder):
    queries = ClassFolderSet(folder, "query", min_side=None)
    gallery = ClassFolderSet(folder, "db")
    assert queries.item_names == ["eiffel/q1.jpg", "louvre/nested/q2.png"] and queries.labels == ["eiffel", "louvre"]
    assert gallery.labels == ["eiffel", "eiffel", "eiffel", None, "louvre", "pisa"] and gallery.bbxs is None
    assert queries.bbxs[0].tolist() == [10.0, 5.0, 40.5, 35.0] and queries.bbxs[1] is None
    whole = cv2.imread(queries.image_paths[0])
    np.testing.assert_array_equal(queries.read(0), whole[5:35, 10:40])  # revisitop's int() truncation
    assert queries.read(1).shape == (50, 70, 3)  # no box: the whole image
    assert len(queries[0]) == 1 and tuple(queries[0][0].shape) == (3, 30, 30)
    assert "cropped to box" in queries.describe(0) and queries.name == "shoes/test"
    assert class_folder_title(folder / "query") == "query" and class_folder_title(folder) == "shoes/test"


@pytest.mark.parametrize("what, content, words", [
    ("junk.txt", "eiffel/nope.jpg\n", "junk.txt:1: eiffel/nope.jpg is not an image of"),
    ("junk.txt", "# c\nloose.jpg\n", "junk.txt:2: loose.jpg has no class folder"),
    ("query_boxes.csv", "path,x,y,w,h\n", "expected the header path,x1,y1,x2,y2"),
    ("query_boxes.csv", "path,x1,y1,x2,y2\neiffel/q1.jpg,10,5,4,35\n", "query_boxes.csv:2: a box is 4 numbers"),
    ("query_boxes.csv", "path,x1,y1,x2,y2\neiffel/q9.jpg,1,1,4,4\n", "query_boxes.csv:2: eiffel/q9.jpg is not a query"),
    ("query_boxes.csv", "path,x1,y1,x2,y2\neiffel/q1.jpg,1,1,4,4\neiffel/q1.jpg,1,1,5,5\n", "a second box"),
])
def test_a_bad_junk_list_or_box_file_names_the_file_and_line(folder, what, content, words):
    (folder / what).write_text(content)
    with pytest.raises(InvalidValueError, match=words.replace(".", r"\.")):
        list_class_folder(folder)


def test_a_folder_not_in_the_layout_is_a_clear_error(folder, tmp_path):
    with pytest.raises(MissingFileError, match="expected .*query/<class>/<images>"):
        list_class_folder(tmp_path / "nowhere")
    write_image(folder / "query" / "stray.jpg", 10, 10, 0)
    with pytest.raises(InvalidValueError, match="query images must be in class folders; .*stray.jpg"):
        list_class_folder(folder)
    (folder / "query" / "stray.jpg").unlink()
    for p in (folder / "gallery").rglob("*.jpg"):
        p.unlink()
    with pytest.raises(MissingFileError, match="no images in .*gallery"):
        list_class_folder(folder)


def test_revisitop_layout_round_trip(folder, tmp_path):
    out = write_revisitop(folder, tmp_path / "data", "shoes")
    written = load_ground_truth(out / "gnd_shoes.pkl")  # the project's restricted unpickler accepts it
    assert written["imlist"][0] == "gallery__eiffel__a" and written["qimlist"][1] == "query__louvre__nested__q2"
    listing = list_class_folder(folder)
    for entry, expected in zip(written["gnd"], listing.ground_truth()):
        for key in ("easy", "hard", "junk"):
            assert entry[key].tolist() == expected[key].tolist()
        assert entry["class"] == expected["class"]
    assert written["gnd"][0]["bbx"].tolist() == [10.0, 5.0, 40.5, 35.0]
    assert written["gnd"][1]["bbx"].tolist() == [0.0, 0.0, 70.0, 50.0]  # no box: the whole image
    # read as revisitop: the same pixels, crops and positives as the class folder (the PNG kept byte for byte)
    for split in ("query", "db"):
        ours, theirs = ClassFolderSet(folder, split), RevisitedDataset(tmp_path / "data", "shoes", split)
        assert len(ours) == len(theirs)
        for i in range(len(ours)):
            np.testing.assert_array_equal(ours.read(i), theirs.read(i))
    assert (out / "jpg" / "query__louvre__nested__q2.jpg").read_bytes() == \
        (folder / "query" / "louvre" / "nested" / "q2.png").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_revisitop(folder, tmp_path / "data", "shoes")
    assert write_revisitop(folder, tmp_path / "data", "shoes", overwrite=True) == out


def test_names_that_would_collide_in_the_revisitop_layout_are_refused(folder):
    write_image(folder / "gallery" / "eiffel" / "a.png", 10, 10, 0)  # eiffel/a.jpg and eiffel/a.png: one flat name
    with pytest.raises(InvalidValueError, match="eiffel/a.jpg and eiffel/a.png would both be named gallery__eiffel__a"):
        revisitop_ground_truth(list_class_folder(folder))


def test_the_ground_truth_pickle_holds_only_what_revisitop_files_hold(folder, tmp_path):
    out = write_revisitop(folder, tmp_path, "s")
    raw = pickle.loads((out / "gnd_s.pkl").read_bytes())
    assert set(raw) == {"imlist", "qimlist", "gnd"}
    assert all(set(g) == {"bbx", "easy", "hard", "junk", "class"} for g in raw["gnd"])
