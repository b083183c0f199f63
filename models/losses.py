"""Training losses of CVNet (Lee et al., CVPR 2022). CVNet-Global (Sec. 3.1): a CurricularFace-margined
classification loss (Eq. 1) plus a momentum contrastive loss (Eq. 2) against a FIFO queue of labelled keys from an
EMA key encoder. CVNet-Rerank (Sec. 3.4): cross-entropy on the two-way logits of (query, positive) and (query, hard
negative) pairs. Where the default values come from: the comment above ``DEFAULT_MARGIN``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import InvalidValueError

logger = logging.getLogger(__name__)

# Sources, and how sure each value is. CurricularFace itself: Huang et al., "CurricularFace: Adaptive Curriculum
# Learning Loss for Deep Face Recognition", CVPR 2020 (target cos(theta_y + m), hard negatives
# cos(theta_j) * (t + cos(theta_j)), t a running mean of the target cosine with momentum 0.01, the th/mm fallback
# when theta_y + m > pi); that paper's face-recognition defaults are m = 0.5, s = 64. CVNet's m = 0.15, s = 30
# (tau = 1/30) and the key-encoder momentum 0.999 come from this project's brief: the CVNet paper text could not
# be retrieved here to confirm them. The queue length is not known from the paper: DEFAULT_QUEUE_SIZE is ours.
DEFAULT_MARGIN = 0.15  # CVNet's CurricularFace margin m (project brief; unconfirmed against the paper text)
DEFAULT_SCALE = 30.0  # CVNet's scale s = 1 / tau (project brief; unconfirmed against the paper text)
DEFAULT_TEMPERATURE = 1.0 / 30.0  # the same tau for the contrastive term (Eq. 1 and Eq. 2 share one tau)
DEFAULT_T_MOMENTUM = 0.01  # CurricularFace (Huang et al. 2020): t <- 0.01 * mean(cos theta_y) + 0.99 * t
DEFAULT_QUEUE_SIZE = 8192  # not from the paper: 8192 x 2048 float32 keys are 64 MiB, small beside a ResNet

CONTRASTIVE_FORMS = ("supcon", "per_positive")


def _check_labels(labels: Tensor, batch: int, name: str = "labels") -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise InvalidValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")


def curricular_face_logits(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    t: Tensor,
    *,
    margin: float = DEFAULT_MARGIN,
    scale: float = DEFAULT_SCALE,
    t_momentum: float = DEFAULT_T_MOMENTUM,
) -> tuple[Tensor, Tensor]:
    """CurricularFace logits (Huang et al., CVPR 2020; CVNet Eq. 1's margined similarity ``C``).

    embeddings (B, d) descriptors (normalised here), weight (C, d) class centres (normalised here),
    labels (B,) in [0, C), t () the running "t" of the paper. With ``cos_j = <e, w_j>`` and ``y`` the label:

    - target: ``cos(theta_y + m)``, or ``cos_y - mm`` (``mm = sin(pi - m) * m``) where ``cos_y <= cos(pi - m)``,
      i.e. where ``theta_y + m`` would pass pi;
    - other classes: ``cos_j * (t_new + cos_j)`` where ``cos_j > cos(theta_y + m)`` (hard negatives), else ``cos_j``;
    - ``t_new = t_momentum * mean_b(cos_y) + (1 - t_momentum) * t`` (no gradient), used for this very batch,
      as in the authors' release.

    Returns ``(scale * logits (B, C), t_new ())``; ``t_new`` has ``t``'s dtype and device.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise InvalidValueError(
            f"embeddings (B, d) and weight (C, d) must share d, got {tuple(embeddings.shape)} and "
            f"{tuple(weight.shape)}"
        )
    _check_labels(labels, embeddings.shape[0])
    if not 0.0 <= margin < math.pi:
        raise InvalidValueError(f"margin must be in [0, pi), got {margin}")
    cos = (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T).clamp(-1.0, 1.0)
    target = cos.gather(1, labels.view(-1, 1))  # (B, 1) cos(theta_y)
    # the floor keeps d/dcos finite at |cos| = 1 (sqrt'(0) is infinite); it changes nothing elsewhere
    sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
    cos_theta_m = target * math.cos(margin) - sin * math.sin(margin)  # cos(theta_y + m)
    threshold = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    target_logit = torch.where(target > threshold, cos_theta_m, target - mm)
    with torch.no_grad():
        t_new = t_momentum * target.mean().to(t.dtype) + (1.0 - t_momentum) * t
    is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels.view(-1, 1), True)
    hard = (cos > cos_theta_m) & ~is_target
    others = torch.where(hard, cos * (t_new.to(cos.dtype) + cos), cos)
    logits = torch.where(is_target, target_logit.expand_as(cos), others)
    return scale * logits, t_new


class CurricularFace(nn.Module):
    """CurricularFace classification loss: ``CE(curricular_face_logits(...), labels)``.

    Owns the class centres ``weight`` (num_classes, in_features) and the running ``t`` buffer (saved in the
    state_dict, so a resumed run continues the curriculum where it stopped). ``t`` only moves in training mode.
    forward(embeddings (B, in_features), labels (B,)) -> scalar loss.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: float = DEFAULT_MARGIN,
        scale: float = DEFAULT_SCALE,
        t_momentum: float = DEFAULT_T_MOMENTUM,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise InvalidValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.margin = margin
        self.scale = scale
        self.t_momentum = t_momentum
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)  # the CurricularFace release's initialisation
        self.register_buffer("t", torch.zeros(()))

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, num_classes) scaled margined logits; updates ``t`` in training mode."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise InvalidValueError(
                f"labels must lie in [0, {self.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )
        # margins on half-precision cosines are too coarse (cos(0.15) rounds away in fp16)
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        logits, t_new = curricular_face_logits(
            embeddings.to(dtype),
            self.weight.to(dtype),
            labels,
            self.t,
            margin=self.margin,
            scale=self.scale,
            t_momentum=self.t_momentum,
        )
        if self.training:
            self.t.copy_(t_new)
        return logits

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, margin={self.margin}, "
            f"scale={self.scale}"
        )


def momentum_contrastive_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    form: str = "supcon",
) -> Tensor:
    """Supervised momentum contrastive loss of queries against batch keys and a labelled queue (CVNet Eq. 2).

    q (B, d) query-encoder descriptors, k (B, d) key-encoder descriptors of each query's positive view,
    labels (B,), queue (N, d) older keys, queue_labels (N,) with -1 marking empty slots (ignored entirely).
    All descriptors are expected L2-normalised (they are not normalised here). With
    ``s_ij = <q_i, key_j> / temperature`` over the keys ``[k; queue]``, ``P(i)`` the keys with label ``y_i``
    (its own key ``k_i`` included, so never empty) and ``A(i)`` all non-empty keys:

    - ``form="supcon"`` (default, the form this project specifies):
      ``loss_i = -log( sum_{p in P(i)} exp s_ip / sum_{a in A(i)} exp s_ia )``;
    - ``form="per_positive"``: each positive against the negatives only,
      ``loss_i = mean_{p in P(i)} -log( exp s_ip / (exp s_ip + sum_{n in A(i) \\ P(i)} exp s_in) )``,
      which is how a public summary of the CVNet paper writes Eq. 2.

    That summary also wraps the similarities in ``C-bar``, the CurricularFace margin with the classifier's ``t``
    (not updated by this term); that margin is not applied here. Returns the mean of ``loss_i`` over the batch.
    """
    if form not in CONTRASTIVE_FORMS:
        raise InvalidValueError(f"form must be one of {CONTRASTIVE_FORMS}, got {form!r}")
    if temperature <= 0:
        raise InvalidValueError(f"temperature must be > 0, got {temperature}")
    if q.dim() != 2 or q.shape != k.shape:
        raise InvalidValueError(f"q and k must both be (B, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise InvalidValueError(f"queue must be (N, {q.shape[1]}), got {tuple(queue.shape)}")
    _check_labels(labels, q.shape[0])
    _check_labels(queue_labels, queue.shape[0], "queue_labels")
    if labels.numel() and int(labels.min()) < 0:
        raise InvalidValueError("query labels must be >= 0 (-1 is reserved for empty queue slots)")

    keys = torch.cat([k, queue.to(k.dtype)], dim=0)  # (B + N, d); a new tensor, so the queue may change later
    key_labels = torch.cat([labels, queue_labels.to(labels.dtype)], dim=0)
    sim = (q @ keys.T) / temperature  # (B, B + N)
    valid = (key_labels >= 0).unsqueeze(0)
    positive = (labels.unsqueeze(1) == key_labels.unsqueeze(0)) & valid
    # a finite floor instead of -inf: a row with no negatives must give 0, not a nan gradient
    floor = torch.finfo(sim.dtype).min
    if form == "supcon":
        log_all = sim.masked_fill(~valid, floor).logsumexp(dim=1)
        log_pos = sim.masked_fill(~positive, floor).logsumexp(dim=1)
        per_query = log_all - log_pos
    else:
        log_neg = sim.masked_fill(~(valid & ~positive), floor).logsumexp(dim=1, keepdim=True)  # (B, 1)
        per_pair = torch.logaddexp(sim, log_neg) - sim  # -log(e^s_p / (e^s_p + sum_n e^s_n))
        per_pair = per_pair.masked_fill(~positive, 0.0)
        per_query = per_pair.sum(dim=1) / positive.sum(dim=1)
    return per_query.mean()


class LabelledQueue(nn.Module):
    """A FIFO ring buffer of key descriptors and their labels (the "queue" of CVNet-Global's momentum branch).

    Buffers (all in the state_dict, so a resumed run keeps its queue): ``queue`` (size, dim) zeros,
    ``labels`` (size,) -1 for empty slots, ``ptr`` () the next slot to write.
    """

    def __init__(self, dim: int, size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise InvalidValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")
        self.dim = dim
        self.size = size
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """Write keys (B, dim) and labels (B,) at ``ptr``, wrapping to the start; oldest entries are overwritten.

        A batch longer than the queue keeps only its last ``size`` entries. Under DDP, gather the keys of all
        ranks first so that every rank holds the same queue.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise InvalidValueError(f"keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        _check_labels(labels, keys.shape[0])
        if labels.numel() and int(labels.min()) < 0:
            raise InvalidValueError("labels must be >= 0 (-1 marks empty slots)")
        keys, labels = keys.detach(), labels.detach()
        if keys.shape[0] > self.size:
            keys, labels = keys[-self.size :], labels[-self.size :]
        n = keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)

    def __len__(self) -> int:
        """Number of filled slots."""
        return int((self.labels >= 0).sum())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"


class MomentumContrastiveLoss(nn.Module):
    """CVNet-Global's momentum contrastive loss with its labelled queue (see :func:`momentum_contrastive_loss`).

    forward(q (B, dim) query descriptors, k (B, dim) momentum-encoder descriptors of the positives, labels (B,))
    -> scalar loss. q and k are L2-normalised here; the loss uses the queue as it was *before* this batch, then,
    in training mode only (so validation passes leave it untouched), the detached keys are enqueued.
    No gradient reaches the queue or k.

    ``gather``: under data parallelism, a function concatenating a tensor (n, ...) over all processes in a fixed
    order (e.g. ``helpers.distributed.all_gather_cat``); every process then enqueues the keys of all of them, so
    the queues stay identical. None: this process's keys only.
    """

    def __init__(
        self,
        dim: int,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        temperature: float = DEFAULT_TEMPERATURE,
        form: str = "supcon",
        gather: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if form not in CONTRASTIVE_FORMS:
            raise InvalidValueError(f"form must be one of {CONTRASTIVE_FORMS}, got {form!r}")
        if temperature <= 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.form = form
        self.gather = gather
        self.queue = LabelledQueue(dim, queue_size)

    def forward(self, q: Tensor, k: Tensor, labels: Tensor) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k.detach().to(dtype), dim=1)
        loss = momentum_contrastive_loss(
            q,
            k,
            labels,
            self.queue.queue,
            self.queue.labels,
            temperature=self.temperature,
            form=self.form,
        )
        if self.training:
            if self.gather is not None:
                k, labels = self.gather(k), self.gather(labels)
            self.queue.enqueue(k, labels)
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.6g}, form={self.form!r}"


# --------------------------------------------------------------------------------------------------------------
# CVNet-Rerank (Sec. 3.4)
# --------------------------------------------------------------------------------------------------------------

RERANK_PAIR_MODES = ("mined", "all")


def training_pairs(labels: Tensor, key_labels: Tensor, mode: str = "mined") -> tuple[Tensor, Tensor, Tensor]:
    """(query_index (P,), key_index (P,), target (P,)) of the pairs a CVNet-Rerank batch trains on.

    labels (B,) of the queries; key_labels (2B,): the B positives then the B mined negatives. ``"mined"``: each
    query with its own positive and its own hard negative (P = 2B, the paper's); ``"all"``: each query with
    every key of the batch (P = 2B^2 from the same images: the other queries' keys add easy negatives and
    extra positives). Target 1 = same landmark.
    """
    b = labels.shape[0]
    if mode == "mined":
        qi = torch.arange(b, device=labels.device).repeat(2)
        kj = torch.arange(2 * b, device=labels.device)
    elif mode == "all":
        qi = torch.arange(b, device=labels.device).repeat_interleave(2 * b)
        kj = torch.arange(2 * b, device=labels.device).repeat(b)
    else:
        raise InvalidValueError(f"pairs must be one of {RERANK_PAIR_MODES}, got {mode!r}")
    return qi, kj, (labels[qi] == key_labels[kj]).long()


def balanced_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced cross-entropy: the mean over positive pairs and the mean over negative pairs, averaged
    (equal weight to each class present). logits (P, 2), target (P,) in {0, 1} -> scalar (float32 or wider)."""
    per_pair = F.cross_entropy(logits.float(), target, reduction="none")
    parts = [per_pair[target == c].mean() for c in (0, 1) if bool((target == c).any())]
    return torch.stack(parts).mean()
