"""The datasets of an evaluation: which ones a run evaluates (a named dataset is never replaced by the built-in
one), the one-line error for a named dataset that is not on disk, the descriptors held per (dataset, kind, flip),
the global ranking over them, the distractors' storage and the reader behind +1M grids."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import MissingFileError
from datasets.folder import ClassFolderSet
from datasets.revisited import RevisitedDataset
from helpers.config import ConfigError
from helpers.evaluation.data import (
    CombinedReader,
    DescriptorKey,
    Descriptors,
    DeviceCopies,
    GlobalRanking,
    check_named_dataset,
    dataset_protocols,
    file_name,
    folder_training_dir,
    item_names,
    open_revisited,
    rank_descriptors,
    resolve_datasets,
    stored_distractors,
)
from helpers.reranking import global_ranking
from tests.support.class_folder import make_class_folder, write_image


def _data(datasets, synthetic):
    return {"datasets": datasets, "synthetic": {"name": synthetic, "config": {}}}


def test_named_datasets_are_evaluated_and_the_builtin_one_only_when_none_is_named():
    assert resolve_datasets(_data([], "synth")) == (["synth"], True)
    # the default config's data.synthetic.name does not replace what the user named
    assert resolve_datasets(_data(["roxford5k"], "synth")) == (["roxford5k"], False)
    assert resolve_datasets(_data(["roxfrod5k", "rparis6k"], "synth")) == (["roxfrod5k", "rparis6k"], False)
    assert resolve_datasets(_data(["roxford5k"], None)) == (["roxford5k"], False)
    # naming the built-in one draws it
    assert resolve_datasets(_data(["synth"], "synth")) == (["synth"], True)
    assert resolve_datasets(_data(["synth", "roxford5k"], "synth")) == (["synth", "roxford5k"], True)
    with pytest.raises(ConfigError, match="data.datasets is empty"):
        resolve_datasets(_data([], None))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_named_dataset_missing_from_disk_is_one_line_naming_it_and_what_to_fetch(tmp_path):
    root = str(tmp_path)
    with pytest.raises(MissingFileError) as err:
        check_named_dataset(root, "roxford5k")
    text = _one_line(err)
    assert "roxford5k" in text and str(tmp_path / "roxford5k") in text
    assert f"python prepare_data.py download --root {root} --datasets roxford5k" in text
    (tmp_path / "roxford5k").mkdir()
    with pytest.raises(MissingFileError) as err:
        check_named_dataset(root, "roxford5k")
    assert f"ground-truth file {tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl'} is missing" in _one_line(err)
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": []}, f)
    with pytest.raises(MissingFileError, match="image folder"):
        check_named_dataset(root, "roxford5k")
    (tmp_path / "roxford5k" / "jpg").mkdir()
    check_named_dataset(root, "roxford5k")  # all there
    # a misspelt name: said, with the names that exist and how the built-in benchmark is run
    with pytest.raises(MissingFileError) as err:
        check_named_dataset(root, "roxfrod5k")
    text = _one_line(err)
    assert "roxfrod5k" in text and "roxford5k, rparis6k" in text and "data.datasets is empty" in text


def _descriptors(with_distractors=True):
    g = torch.Generator().manual_seed(0)
    xb = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    xq = F.normalize(xb[:4] + 0.3 * torch.randn(4, 8, generator=g), dim=1)
    extra = F.normalize(torch.randn(20, 8, generator=g), dim=1).half() if with_distractors else None
    return Descriptors(query=xq, db=xb, distractors=extra)


def test_descriptors_give_the_database_alone_or_with_the_distractors_as_parts():
    d = _descriptors()
    assert d.database() is d.db and d.database(False) is d.db
    parts = d.database(True)
    assert isinstance(parts, list) and len(parts) == 2 and parts[0] is d.db and parts[1] is d.distractors  # no copy
    with pytest.raises(ValueError, match="no distractors"):
        _descriptors(with_distractors=False).database(True)
    # keys: one per (dataset, kind, flip), equal by value
    assert DescriptorKey("synth", "superglobal", True) == DescriptorKey("synth", "superglobal", flip=True)
    assert DescriptorKey("synth", "superglobal") != DescriptorKey("synth", "superglobal", True)
    assert len({DescriptorKey("a", "k"), DescriptorKey("a", "k", False), DescriptorKey("b", "k")}) == 2


@pytest.mark.parametrize("with_distractors", [False, True])
def test_rank_descriptors_is_the_global_ranking_of_what_it_returns(with_distractors):
    d = _descriptors()
    ranked = rank_descriptors(d, with_distractors=with_distractors)
    assert isinstance(ranked, GlobalRanking)
    ranks, xq, xb = ranked  # unpacks as the (ranks, xq, xb) the detail and post-row code read
    assert xq is d.query and ranks.dtype == np.int32
    n_db = 30 + (20 if with_distractors else 0)
    assert ranks.shape == (n_db, 4)
    whole = torch.cat([d.db, d.distractors.float()]) if with_distractors else d.db
    _, expected = global_ranking(d.query, whole)
    np.testing.assert_array_equal(ranks, expected)
    if with_distractors:
        assert xb[0] is d.db and xb[1] is d.distractors


def test_device_copies_are_made_once_and_within_the_budget():
    """The run's copies of its descriptors on its device (a stand-in, "meta", here): each tensor copied at its
    first ranking and reused after, until the budget is taken; what does not fit stays where it is. On the CPU
    nothing is copied."""
    d = _descriptors()
    db_bytes = d.db.numel() * d.db.element_size()
    copies = DeviceCopies("meta", budget=db_bytes + 1)
    first = copies(d.db)
    assert first.device.type == "meta" and copies(d.db) is first and copies.nbytes == db_bytes
    assert copies(d.distractors) is d.distractors  # over the budget: ranked from host memory
    assert copies(d.db.clone()) is not first  # another tensor, even of equal values, is another copy
    on_cpu = DeviceCopies("cpu")
    assert on_cpu(d.db) is d.db and on_cpu.nbytes == 0


@pytest.mark.parametrize("with_distractors", [False, True])
def test_ranking_from_device_copies_is_the_same_ranking(with_distractors):
    d = _descriptors()
    plain = rank_descriptors(d, with_distractors=with_distractors)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    copies = DeviceCopies(device)
    for _ in range(2):  # the second ranking reuses the copies of the first
        ranked = rank_descriptors(d, with_distractors=with_distractors, device=device, copies=copies)
        np.testing.assert_array_equal(ranked.ranks, plain.ranks)
        assert ranked.query is d.query and (ranked.database is d.db or ranked.database[0] is d.db)
    held = d.db.numel() * d.db.element_size() + (d.distractors.numel() * 2 if with_distractors else 0)
    assert copies.nbytes == (held if device == "cuda" else 0)


def test_distractors_storage():
    x = torch.randn(4, 3)
    assert stored_distractors(x, "float32") is x
    assert stored_distractors(x, "float16").dtype == torch.float16
    assert stored_distractors(None, "float16") is None


class _Images:
    def __init__(self, values):
        self.values = values
        self.image_paths = [f"/data/jpg/{v}.jpg" for v in values]

    def __len__(self):
        return len(self.values)

    def read(self, j):
        return self.values[j]


def test_combined_reader_continues_after_the_database():
    reader = CombinedReader(_Images(["a", "b"]), _Images(["x", "y", "z"]))
    assert [reader.read(j) for j in range(5)] == ["a", "b", "x", "y", "z"]
    assert CombinedReader(_Images(["a"]), None).read(0) == "a"
    assert [reader.name(j) for j in (0, 1, 2, 4)] == ["a.jpg", "b.jpg", "x.jpg", "z.jpg"]


def test_a_class_folder_is_named_folder_path_and_opened_as_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_class_folder(tmp_path / "shoes" / "test")
    names, builtin = resolve_datasets(_data(["folder:shoes//test/", "synth"], "synth"))
    assert names == ["folder:shoes/test", "synth"] and builtin  # the path as written, its separators normalised
    with pytest.raises(ConfigError, match="names a dataset twice"):
        resolve_datasets(_data(["folder:shoes/test", "folder:shoes/test/"], None))
    check_named_dataset("data", "folder:shoes/test")  # on disk: nothing raised
    with pytest.raises(MissingFileError) as err:
        check_named_dataset("data", "folder:shoes/nope")
    assert "shoes/nope" in _one_line(err) and "query/<class>/<images>" in _one_line(err)
    kw = {"root": "data", "convention": None, "scales": (1.0,), "min_side": None}
    queries = open_revisited(name="folder:shoes/test", split="query", **kw)
    gallery = open_revisited(name="folder:shoes/test", split="db", **kw)
    assert isinstance(queries, ClassFolderSet) and len(gallery) == 6
    assert dataset_protocols(queries) == (("class",), True)
    assert item_names(queries) == ["eiffel/q1.jpg", "louvre/nested/q2.png"]
    reader = CombinedReader(gallery, None)
    assert [reader.name(j) for j in range(len(gallery))][:2] == ["eiffel/a.jpg", "eiffel/b.jpg"]
    # file names: a class folder's label without separators; every other label as it is
    assert file_name("folder:shoes/test") == "folder-shoes-test"
    assert file_name("folder:shoes/test+1m") == "folder-shoes-test+1m"
    assert file_name("roxford5k+1m") == "roxford5k+1m"


def test_revisited_sets_keep_their_protocols_and_file_names(tmp_path):
    from datasets.synthetic import SyntheticConfig, build_synthetic

    build_synthetic(tmp_path, name="s", config=SyntheticConfig(n_landmarks=2, views_per_landmark=2, n_distractors=1,
                                                              image_size=(96, 64), train_landmarks=1,
                                                              train_views_per_landmark=2), progress=False)
    queries = open_revisited(root=str(tmp_path), name="s", split="query", convention=None, scales=(1.0,),
                             min_side=None)
    assert isinstance(queries, RevisitedDataset)
    assert dataset_protocols(queries) == (("easy", "medium", "hard"), False)
    assert item_names(queries) == ["lm000_q0.jpg", "lm001_q0.jpg"]


def test_a_class_folders_whitening_learns_on_its_training_images(tmp_path):
    test = make_class_folder(tmp_path / "shoes" / "test")
    assert folder_training_dir(["synth", f"folder:{test}"]) is None
    write_image(tmp_path / "shoes" / "training" / "a" / "1.jpg", 8, 8, 0)  # the CLIP layout: beside test/
    assert folder_training_dir([f"folder:{test}"]) == str(tmp_path / "shoes" / "training")
    write_image(test / "training" / "a" / "1.jpg", 8, 8, 0)  # inside PATH first
    assert folder_training_dir(["roxford5k", f"folder:{test}"]) == str(test / "training")
