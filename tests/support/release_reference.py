"""An independent, deliberately plain re-statement of the released networks, for parity tests.

It follows the official module tree (pycls names: ``stem.conv``, ``s3.b2.f.b_bn``, ``head.pool.p``,
``conv2ds``, ``cv_learner``), so its ``state_dict()`` *is* a checkpoint in the official layout, and it computes
the descriptors and scores the way the releases describe them (spec: shared/spec/official-models.md).
Interpolations and convolutions are written in other forms than the project's code (separable interpolation
matrices, full 4D kernels) so that the comparison is not the code against itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Clamp(nn.Module):
    def __init__(self, floor: float) -> None:
        super().__init__()
        self.floor = floor

    def forward(self, x):
        return torch.maximum(x, torch.full_like(x, self.floor))


class Transform(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b, inner_floor):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b)
        self.a_relu = Clamp(inner_floor)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b)
        self.b_relu = Clamp(inner_floor)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x):
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class Block(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b, inner_floor, out_floor):
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = Transform(w_in, w_out, stride, w_b, inner_floor)
        self.out_floor = out_floor

    def residual_sum(self, x):
        short = self.bn(self.proj(x)) if hasattr(self, "proj") else x
        return short + self.f(x)

    def forward(self, x):
        return torch.maximum(self.residual_sum(x), torch.full((), self.out_floor))


class GeMP(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * 3)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = GeMP()
        self.fc = nn.Linear(2048, 2048)


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2, 1)


class Encoder(nn.Module):
    """The pycls ResNet; ``relup=True`` reproduces SuperGlobal's ReLU-up placement."""

    def __init__(self, depth: int, relup: bool = False):
        super().__init__()
        self.stem = Stem()
        widths = [(64, 256, 1, 64), (256, 512, 2, 128), (512, 1024, 2, 256), (1024, 2048, 2, 512)]
        for si, ((w_in, w_out, stride, w_b), n) in enumerate(zip(widths, DEPTHS[depth]), start=1):
            stage = nn.Module()
            for bi in range(n):
                inner = 0.014 if (relup and si == 1) else 0.0
                outer = 0.014 if (relup and si <= 3) else 0.0
                stage.add_module(
                    f"b{bi + 1}", Block(w_in if bi == 0 else w_out, w_out, stride if bi == 0 else 1, w_b, inner, outer)
                )
            self.add_module(f"s{si}", stage)
        self.head = Head()

    def stages(self, x, upto=4):
        x = self.stem(x)
        for si in range(1, upto + 1):
            for block in getattr(self, f"s{si}").children():
                x = block(x)
        return x

    def s3_preact(self, x):
        x = self.stem(x)
        for si in (1, 2):
            for block in getattr(self, f"s{si}").children():
                x = block(x)
        blocks = list(self.s3.children())
        for block in blocks[:-1]:
            x = block(x)
        return blocks[-1].residual_sum(x)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BN statistics, so that a wrong mapping of any tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("running_mean") or name.endswith("bn.bias") or name.endswith("_bn.bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif name.endswith("pool.p"):
                t.fill_(3.0 + float(torch.rand(1, generator=g)))
            elif t.dim() == 1 and name.endswith("weight"):  # BatchNorm / GroupNorm scales
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(1.0 / fan_in))
    return module


def cvnet_global(enc: Encoder, images):
    x = enc.stages(images)
    p = enc.head.pool.p
    pooled = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p).flatten(1)
    return F.normalize(enc.head.fc(pooled), dim=1)


def superglobal(enc: Encoder, images, gemp=True, rgem=True, sgem=True, scales=(0.7071, 1.0, 1.4142)):
    outs = []
    for s in scales:
        h, w = images.shape[-2:]
        x = TF.resize(images, [int(h * s), int(w * s)])
        x = enc.stages(x)
        if rgem:
            lp = nn.LPPool2d(2.5, 5, stride=1)
            x = 0.5 * lp(nn.ReflectionPad2d(2)(x / 25 ** (1 / 2.5))) + 0.5 * x
        x = x.reshape(x.shape[0], x.shape[1], -1)
        if gemp:
            x = F.adaptive_avg_pool1d(x.clamp(min=1e-8).pow(4.6), 1).pow(1 / 4.6)
        else:
            p = enc.head.pool.p
            x = F.adaptive_avg_pool1d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p)
        outs.append(enc.head.fc(F.normalize(x.flatten(1), dim=-1)))
    stacked = torch.stack(outs)
    agg = F.normalize(stacked, dim=-1).max(0)[0] if sgem else stacked.mean(0)
    return F.normalize(agg, dim=-1)


def interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1D linear interpolation with align_corners=True."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        pos = 0.0 if n_out == 1 else i * (n_in - 1) / (n_out - 1)
        lo = min(int(math.floor(pos)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = pos - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def resize2d(x, size):
    """Bilinear align_corners=True resize of (..., h, w) via interpolation matrices."""
    a = interp_matrix(x.shape[-2], size[0]).to(x.dtype)
    b = interp_matrix(x.shape[-1], size[1]).to(x.dtype)
    return torch.einsum("ih,...hw,jw->...ij", a, x, b)


def resize4d(x, size):
    ha, wa, hb, wb = size
    mats = [interp_matrix(n, m).to(x.dtype) for n, m in zip(x.shape[-4:], size)]
    return torch.einsum("ai,bj,ck,dl,...ijkl->...abcd", *mats, x)


class RerankReference(nn.Module):
    """CVNet_Rerank's module tree: ``encoder_q``, ``conv2ds``, ``cv_learner`` (blockN.I.conv1/conv2, GN, mlp)."""

    def __init__(self, depth: int):
        super().__init__()
        self.encoder_q = Encoder(depth)
        self.conv2ds = nn.ModuleList(nn.Conv2d(1024, 256, 3, padding=1, bias=False) for _ in range(3))
        self.cv_learner = nn.Module()
        specs = {1: [(9, 16, 5, 2)], 2: [(16, 16, 3, 1), (16, 32, 3, 2)],
                 3: [(32, 32, 3, 1), (32, 32, 3, 1), (32, 64, 3, 2)],
                 4: [(64, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 1)]}
        for bi, layers in specs.items():
            seq = nn.Sequential()
            for li, (cin, cout, k, s) in enumerate(layers):
                conv = nn.Module()
                conv.conv1 = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)
                conv.conv2 = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)
                conv.meta = (k, s)
                seq.add_module(str(3 * li), conv)
                seq.add_module(str(3 * li + 1), nn.GroupNorm(4, cout))
                seq.add_module(str(3 * li + 2), nn.ReLU())
            setattr(self.cv_learner, f"block{bi}", seq)
        self.cv_learner.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def correlation(self, fq, fk):
        hq, wq = fq.shape[-2:]
        hk, wk = fk.shape[-2:]
        qs, ks = [], []
        for s, conv in zip((0.25, 0.5, 1.0), self.conv2ds):
            r = math.sqrt(s)
            qs.append(conv(resize2d(fq, (round(hq * r), round(wq * r)))))
            ks.append(conv(resize2d(fk, (round(hk * r), round(wk * r)))))
        chans = []
        for q in qs:
            for k in ks:
                c = torch.einsum("bcij,bckl->bijkl", q, k)
                nq = q.norm(dim=1)[:, :, :, None, None]
                nk = k.norm(dim=1)[:, None, None, :, :]
                chans.append(resize4d(c / (nq * nk + 1e-8), (hq, wq, hk, wk)))
        return torch.stack(chans, 1).clamp(min=0)

    def logits(self, corr):
        x = corr
        for bi in range(1, 5):
            for layer in getattr(self.cv_learner, f"block{bi}"):
                x = conv4d_full(x, layer) if hasattr(layer, "conv1") else layer(x)
        return self.cv_learner.mlp(x.flatten(2).mean(-1))

    def score_maps(self, fq, fk):
        return torch.softmax(self.logits(self.correlation(fq, fk)), dim=1)[:, 1]

    def forward(self, q, k):
        return self.score_maps(self.encoder_q.s3_preact(q), self.encoder_q.s3_preact(k))


def naive_conv4d(x, w4, bias, stride, padding):
    """Direct 4D convolution: x (B, Cin, a, b, c, d), w4 (Cout, Cin, k, k, k, k), strides per dim."""
    k = w4.shape[-1]
    xp = F.pad(x, [padding] * 8)
    out_sizes = [(n + 2 * padding - k) // s + 1 for n, s in zip(x.shape[2:], stride)]
    out = torch.zeros(x.shape[0], w4.shape[0], *out_sizes, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            for m in range(k):
                for n in range(k):
                    wk = w4[:, :, i, j, m, n]
                    if not wk.any():
                        continue
                    sl = xp[:, :,
                            i: i + stride[0] * out_sizes[0]: stride[0],
                            j: j + stride[1] * out_sizes[1]: stride[1],
                            m: m + stride[2] * out_sizes[2]: stride[2],
                            n: n + stride[3] * out_sizes[3]: stride[3]]
                    out += torch.einsum("oc,bcijkl->boijkl", wk, sl)
    return out + bias.view(1, -1, 1, 1, 1, 1)


def center_pivot_kernel(w1, w2):
    """The full 4D kernel a center-pivot conv stands for: w1 on the query plane, w2 on the key plane."""
    k = w1.shape[-1]
    c = k // 2
    w4 = torch.zeros(*w1.shape[:2], k, k, k, k, dtype=w1.dtype)
    w4[:, :, :, :, c, c] += w1
    w4[:, :, c, c, :, :] += w2
    return w4


def conv4d_full(x, layer):
    k, s = layer.meta
    w4 = center_pivot_kernel(layer.conv1.weight, layer.conv2.weight)
    return naive_conv4d(x, w4, layer.conv1.bias + layer.conv2.bias, (s, s, s, s), k // 2)


def superglobal_rerank_loop(Q, X, M=400, K=9, beta=0.15):
    """Per-query loop following the release's MDescAug + RerankwMDA step by step (float64)."""
    Q, X = Q.double(), X.double()
    all_scores, all_ids = [], []
    for q in Q:
        sim = X @ q
        top = torch.argsort(-sim)[:M]
        cand = X[top]
        refined = []
        for i in range(len(top)):
            s = cand @ cand[i]
            order = torch.argsort(-s)[: K + 1]
            w = s[order] * beta
            w[0] = 1.0
            refined.append((cand[order] * w[:, None]).sum(0) / w.sum())
        refined = torch.stack(refined)
        s1 = refined @ q
        by_s1 = torch.argsort(-s1)
        expanded = refined[by_s1[: K + 1]].max(0)[0]
        s2 = refined @ expanded
        final = (s1 + s2) / 2
        order = torch.argsort(-final)
        all_scores.append(final[order])
        all_ids.append(top[order])
    return torch.stack(all_scores), torch.stack(all_ids)
