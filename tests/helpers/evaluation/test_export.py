"""helpers.evaluation.export: the files AMES and LoCoRe read, checked by restating how their public loaders read
them."""
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from helpers.evaluation.export import export_shortlists, read_raw_descriptors, top_m
from tests.support.ames_loader import read_ames_shortlist


def test_shortlist_and_descriptors_read_back_as_the_loaders_read_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    xq = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    xb = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    gnd = [{"junk": [3, 7]}, {"junk": []}, {"junk": [0]}, {"junk": [29]}]
    gnd_file = tmp_path / "gnd_toy.pkl"
    with open(gnd_file, "wb") as f:
        pickle.dump({"gnd": gnd}, f)
    written = export_shortlists(tmp_path / "out", dataset="toy", query=xq, database=xb,
                                query_names=[f"jpg/q{i}.jpg" for i in range(4)],
                                database_names=[f"jpg/d{i}.jpg" for i in range(30)], gnd_path=gnd_file, m=10)
    folder = tmp_path / "out" / "toy"
    cache_nn, sims, ids = read_ames_shortlist(folder, gnd)
    assert isinstance(cache_nn, torch.Tensor) and cache_nn.shape == (2, 4, 10) and cache_nn.dtype == torch.float64
    ranking = (xq @ xb.T).argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(cache_nn[1].long(), ranking)  # the project's own ranking, best first
    assert torch.allclose(cache_nn[0].float(), (xq @ xb.T).gather(1, ranking), atol=1e-6)
    for i in range(4):  # junk went to the end, the rest kept its order
        kept = [j for j in ranking[i].tolist() if j not in gnd[i]["junk"]]
        assert ids[i, : len(kept)].tolist() == kept
    # LoCoRe / AMES global descriptors: raw float32 memory maps of (n, d)
    assert np.array_equal(np.memmap(folder / "superglobal_query_global.pt", dtype=np.float32, mode="r",
                                    shape=(4, 16)), xq.numpy())
    assert np.array_equal(read_raw_descriptors(written["gallery_global"], 16), xb.numpy())
    assert (folder / "test_gallery.txt").read_text().splitlines()[5] == "jpg/d5.jpg"
    assert (folder / "gnd_toy.pkl").is_file()


def test_given_ranking_is_written_as_is_and_top_m_is_clamped(tmp_path):
    xq = F.normalize(torch.randn(2, 8), dim=1)
    xb = F.normalize(torch.randn(5, 8), dim=1)
    sims, ids = top_m(xq, xb, 50)
    assert ids.shape == (2, 5)
    reranked = (torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]]), torch.tensor([[4, 0, 2], [1, 3, 0]]))
    export_shortlists(tmp_path, dataset="d", query=xq, database=xb, query_names=["a", "b"],
                      database_names=list("vwxyz"), ranking=reranked, desc_name="superglobal_rerank")
    with open(tmp_path / "d" / "nn_superglobal_rerank.pkl", "rb") as f:
        cache_nn = pickle.load(f)
    assert cache_nn[1].long().tolist() == [[4, 0, 2], [1, 3, 0]]


def test_a_class_folder_is_exported_with_its_ground_truth_in_revisitop_form(tmp_path):
    from datasets.folder import ClassFolderSet, list_class_folder
    from datasets.revisited import load_ground_truth
    from helpers.evaluation.export import export_ames
    from tests.support.class_folder import make_class_folder

    root = make_class_folder(tmp_path / "shoes" / "test")
    queries, gallery = ClassFolderSet(root, "query"), ClassFolderSet(root, "db")
    xq = F.normalize(torch.randn(2, 8), dim=1)
    xb = F.normalize(torch.randn(len(gallery), 8), dim=1)
    ranks = (xb @ xq.T).argsort(dim=0, descending=True).numpy()
    out = export_ames(tmp_path / "ames", name="folder-shoes-test", query_set=queries, db_set=gallery, xq=xq, xb=xb,
                      ranks=ranks, m=4)
    folder = tmp_path / "ames" / "folder-shoes-test"
    assert out["files"]["gnd"] == str(folder / "gnd_folder-shoes-test.pkl")
    gnd = load_ground_truth(folder / "gnd_folder-shoes-test.pkl")["gnd"]
    for entry, expected in zip(gnd, list_class_folder(root).ground_truth()):
        assert entry["easy"].tolist() == expected["easy"].tolist()
        assert entry["junk"].tolist() == expected["junk"].tolist()
    cache_nn, _, ids = read_ames_shortlist(folder, gnd)
    assert cache_nn[1].long().tolist() == ranks[:4].T.tolist()  # the ranking given, as AMES reads it
    assert gnd[0]["junk"].tolist() == [2]  # eiffel/blurry.jpg: moved to the end for query 0 by AMES's loader
    kept = [int(j) for j in ranks[:4, 0] if j != 2]
    assert ids[0, : len(kept)].tolist() == kept
    assert (folder / "test_query.txt").read_text().splitlines() == ["query/eiffel/q1.jpg",
                                                                    "query/louvre/nested/q2.png"]
    assert (folder / "test_gallery.txt").read_text().splitlines()[3] == "gallery/loose.jpg"
