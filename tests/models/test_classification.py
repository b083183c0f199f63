"""ClassificationByRetrieval: per-class aggregation against a plain loop, few-shot use, class removal,
gradients to the query, and the same logits over an external vector database."""
import pytest
import torch
import torch.nn.functional as F

from models import ClassificationByRetrieval
from models.classification import class_logits


def _loop_logits(q, vectors, labels, classes, k, aggregation):
    sims = sorted(((float(q @ v), lab) for v, lab in zip(vectors, labels)), key=lambda t: -t[0])[:k]
    out = []
    for c in classes:
        mine = [s for s, lab in sims if lab == c]
        if not mine:
            out.append(-1.0)
        elif aggregation == "max":
            out.append(max(mine))
        elif aggregation == "sum":
            out.append(sum(mine))
        else:
            out.append(sum(mine) / len(mine))
    return out


@pytest.mark.parametrize("aggregation", ["max", "mean", "sum"])
def test_logits_against_a_loop(aggregation):
    g = torch.Generator().manual_seed(0)
    X = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    labels = [f"c{i % 4}" for i in range(30)]
    Q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    cbr = ClassificationByRetrieval(embedding_dim=8, k=6, aggregation=aggregation)
    cbr.add_index_data(X, labels)
    got = cbr(Q)
    assert cbr.classes == ["c0", "c1", "c2", "c3"]
    want = torch.tensor([_loop_logits(Q[i], X, labels, cbr.classes, 6, aggregation) for i in range(5)])
    assert torch.allclose(got, want, atol=1e-6)


def test_class_logits_padding_and_errors():
    sims = torch.tensor([[0.9, 0.5, 0.4]])
    cols = torch.tensor([[1, -1, 1]])
    assert torch.allclose(class_logits(sims, cols, 3, "sum"), torch.tensor([[-1.0, 1.3, -1.0]]))
    with pytest.raises(ValueError, match="aggregation"):
        class_logits(sims, cols, 3, "median")


def test_one_shot_recognises_noisy_copies_and_classes_can_be_removed():
    g = torch.Generator().manual_seed(1)
    protos = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    cbr = ClassificationByRetrieval(embedding_dim=16, k=3)
    cbr.add_index_data(protos, ["a", "b", "c", "d", "e"])
    noisy = F.normalize(protos + 0.1 * torch.randn(5, 16, generator=g), dim=1)
    assert cbr.predict(noisy) == ["a", "b", "c", "d", "e"]
    assert cbr.remove_class("c") == 1
    assert cbr.classes == ["a", "b", "d", "e"] and cbr(noisy).shape == (5, 4)
    assert cbr.predict(noisy[[0, 1, 3, 4]]) == ["a", "b", "d", "e"]
    with pytest.raises(KeyError):
        cbr.remove_class("zzz")


def test_gradients_reach_the_query_embedding():
    g = torch.Generator().manual_seed(2)
    cbr = ClassificationByRetrieval(embedding_dim=8, k=4)
    cbr.add_index_data(F.normalize(torch.randn(12, 8, generator=g), dim=1), [i % 3 for i in range(12)])
    q = F.normalize(torch.randn(2, 8, generator=g), dim=1).requires_grad_(True)
    loss = F.cross_entropy(cbr(q), torch.tensor([0, 1]))
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_backbone_images_and_errors():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    cbr = ClassificationByRetrieval(backbone=torch.nn.Sequential(backbone, _L2()), embedding_dim=6, k=2)
    with pytest.raises(ValueError, match="index is empty"):
        cbr(torch.randn(1, 3, 4, 4))
    imgs = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        cbr.add_index_data(cbr.embed(imgs), ["x", "y", "x", "y"])
    assert cbr.predict(imgs) == ["x", "y", "x", "y"]
    with pytest.raises(ValueError, match="embeddings must be"):
        cbr.add_index_data(torch.randn(2, 5), ["a", "b"])
    with pytest.raises(ValueError, match="2 labels for 3"):
        cbr.add_index_data(torch.randn(3, 6), ["a", "b"])


class _L2(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def test_external_database_gives_the_same_logits():
    from helpers.vector_db.tensor import TensorVectorDB

    g = torch.Generator().manual_seed(3)
    X = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    labels = [i % 5 for i in range(20)]
    Q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    inner = ClassificationByRetrieval(embedding_dim=8, k=5, aggregation="mean")
    inner.add_index_data(X, labels)
    outer = ClassificationByRetrieval(embedding_dim=8, k=5, aggregation="mean", database=TensorVectorDB(8))
    outer.add_index_data(X, labels)
    assert torch.allclose(inner(Q), outer(Q), atol=1e-6)
    inner.remove_class(2)
    outer.remove_class(2)
    assert len(outer) == 16 and torch.allclose(inner(Q), outer(Q), atol=1e-6)
