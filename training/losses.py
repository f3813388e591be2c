"""Losses for learning face embeddings, from plain softmax to angular margins.

Plain softmax learns features that separate the training identities but leave them
loosely packed, which is a poor fit for clustering unseen people. Each loss below adds
a different pressure towards compact classes; as a rule of thumb the embeddings get
better in the order softmax < triplet < center < A-Softmax, with the additive margins
(CosFace, ArcFace) the usual first choice today.

Every loss is an ``nn.Module`` called as ``loss(features, labels)`` with features of
shape (batch, dim) and integer labels of shape (batch,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginSoftmax(nn.Module):
    """Cross-entropy over scaled cosines between L2-normalised features and class weights.

    Normalising both sides puts every sample on the unit hypersphere, so the logit of
    class j depends only on the angle t_j between the feature and W_j. A subclass
    defines ``margin``, which maps the target cosine cos t_y to a smaller value; the
    other classes keep s * cos t_j. W (num_classes x dim) is a parameter trained with
    the backbone; the scale s is fixed.
    """

    def __init__(self, num_classes: int, dim: int, s: float = 64.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.s = s

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        """Map the target-class cosines (shape (batch,)) to penalised values."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        target = labels[:, None]
        penalised = self.margin(cos.gather(1, target).squeeze(1))
        return self.s * cos.scatter(1, target, penalised[:, None])

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features, labels), labels)


class NormSoftmax(MarginSoftmax):
    """Normalised softmax (NormFace) without a margin: s * cos t_j for every class.

    The baseline for the margin losses: features are compared by angle, as at test
    time, but nothing forces a gap between classes.
    """

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return cos


class CosFace(MarginSoftmax):
    """CosFace / AM-Softmax: the target logit is s * (cos t_y - m).

    An additive cosine margin: simple, stable from the first step, and a strong
    default when ArcFace is hard to get converging.
    """

    def __init__(self, num_classes: int, dim: int, m: float = 0.35, s: float = 64.0):
        super().__init__(num_classes, dim, s)
        self.m = m

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class ArcFace(MarginSoftmax):
    """ArcFace: the target logit is s * cos(t_y + m), an additive angular margin.

    The margin is a constant geodesic gap on the hypersphere, usually the best of the
    margin losses. cos(t + m) stops decreasing once t + m > pi, which would reward
    moving away from the own class, so for t > pi - m the logit falls back to
    s * (cos t - m sin m), as in the reference implementation: still decreasing in t,
    with a small downward step at t = pi - m.

    cos(t + m) is computed as cos t cos m - sin t sin m, with sin t from the cosine,
    so there is no acos and the gradient stays finite at cos t = +-1.
    """

    def __init__(self, num_classes: int, dim: int, m: float = 0.5, s: float = 64.0):
        super().__init__(num_classes, dim, s)
        self.m = m

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-12))
        shifted = cos * math.cos(self.m) - sin * math.sin(self.m)
        return torch.where(cos > math.cos(math.pi - self.m), shifted, cos - self.m * math.sin(self.m))


class SphereFace(MarginSoftmax):
    """SphereFace / A-Softmax: a multiplicative angular margin, target cos(m t_y).

    cos(m t) is not monotonic on [0, pi], so the paper uses
    psi(t) = (-1)^k cos(m t) - 2k for t in [k pi/m, (k+1) pi/m], which decreases
    over the whole range. m must be an integer: cos(m t) is evaluated as the Chebyshev
    polynomial T_m(cos t), so gradients never go through acos (finite at cos = +-1).

    A large m makes training hard to start; the paper blends the target logit as
    (lam * cos t + psi(t)) / (1 + lam) and anneals ``lam`` from about 1000 down to
    about 5 during training. Set the attribute from the training loop; lam = 0 is the
    pure margin. Unlike the paper (which uses the feature norm), the features are
    normalised and scaled by s, as for the other margins here.
    """

    def __init__(self, num_classes: int, dim: int, m: int = 4, s: float = 64.0, lam: float = 0.0):
        super().__init__(num_classes, dim, s)
        if int(m) != m or m < 1:
            raise ValueError(f"SphereFace needs an integer margin m >= 1, got {m}")
        self.m = int(m)
        self.lam = lam

    def psi(self, cos: torch.Tensor) -> torch.Tensor:
        """psi(t) for t = acos(cos): the monotonic extension of cos(m t)."""
        cos = cos.clamp(-1.0, 1.0)
        prev, cos_mt = torch.ones_like(cos), cos
        for _ in range(self.m - 1):
            prev, cos_mt = cos_mt, 2 * cos * cos_mt - prev
        k = torch.floor(self.m * torch.acos(cos.detach()) / math.pi)
        return (1 - 2 * (k % 2)) * cos_mt - 2 * k

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return (self.lam * cos + self.psi(cos)) / (1 + self.lam)


class SoftmaxLoss(nn.Module):
    """Plain softmax: a linear classifier (with bias) on raw features, then cross-entropy.

    The baseline: it separates the training identities but does not make them compact,
    and it is the classification term that center loss needs beside it.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(features), labels)


class CenterLoss(nn.Module):
    """Center loss: lambda_ * 1/2 * sum_i ||x_i - c_{y_i}||^2 / batch.

    Pulls each feature towards a running centre of its class. On its own it collapses
    (every feature and centre shrinks to one point), so use it through
    ``SoftmaxCenterLoss``. The centres are a buffer, not a parameter: the optimizer
    does not see them. As in the original paper (Wen et al. 2016) they move by their
    own rate ``alpha`` after each training-mode forward:
    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j).

    lambda_ depends on the feature scale: the default is the paper's 0.003 (with
    alpha 0.5); runs reported on large-norm features used 1e-6..1e-5, so tune it
    against the norm of your embeddings.
    """

    def __init__(self, num_classes: int, dim: int, lambda_: float = 0.003, alpha: float = 0.5):
        super().__init__()
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.lambda_ = lambda_
        self.alpha = alpha

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = features - self.centers[labels]
        loss = self.lambda_ * 0.5 * diff.pow(2).sum() / features.shape[0]
        if self.training:
            self._update_centers(diff.detach().to(self.centers.dtype), labels)
        return loss

    @torch.no_grad()
    def _update_centers(self, diff: torch.Tensor, labels: torch.Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.centers.shape[0]).to(diff.dtype)
        delta = torch.zeros_like(self.centers).index_add_(0, labels, -diff)
        self.centers -= self.alpha * delta / (1 + counts)[:, None]


class SoftmaxCenterLoss(nn.Module):
    """Softmax + center loss, the combination the center-loss paper trains with.

    Softmax keeps the classes apart, the center term makes each one compact.
    """

    def __init__(self, num_classes: int, dim: int, lambda_: float = 0.003, alpha: float = 0.5):
        super().__init__()
        self.softmax = SoftmaxLoss(num_classes, dim)
        self.center = CenterLoss(num_classes, dim, lambda_, alpha)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.softmax(features, labels) + self.center(features, labels)


class TripletLoss(nn.Module):
    """FaceNet triplet loss with semi-hard negatives, over every anchor-positive pair.

    Distances are squared Euclidean; the default margin 0.2 assumes L2-normalised
    embeddings (normalise before calling). For each ordered pair (a, p) with the same
    label, the negative is the closest one with d(a, n) > d(a, p): a semi-hard negative
    (d(a, p) < d(a, n) < d(a, p) + margin) when one exists, otherwise an easy one that
    gives zero loss. If every negative is closer than the positive, the farthest
    negative is used: the hardest negatives make training collapse early. Anchors with
    no negative in the batch are skipped.

    Needs large batches with several images per identity. Returns the loss averaged
    over all pairs and the fraction of pairs whose triplet is active (loss > 0), a
    useful signal of how much the batch still teaches.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        sq = embeddings.pow(2).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2 * embeddings @ embeddings.T).clamp(min=0)
        same = labels[:, None] == labels[None, :]
        has_negative = (~same).any(1)
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device) & has_negative[:, None]
        anchor, positive = pos.nonzero(as_tuple=True)
        if anchor.numel() == 0:
            return embeddings.sum() * 0.0, 0.0

        d_ap = dist[anchor, positive]
        d_an = dist[anchor]
        negative = ~same[anchor]
        with torch.no_grad():
            beyond = negative & (d_an > d_ap[:, None])
            closest_beyond = torch.where(beyond, d_an, torch.inf).argmin(1)
            farthest = torch.where(negative, d_an, -torch.inf).argmax(1)
            chosen = torch.where(beyond.any(1), closest_beyond, farthest)
        per_pair = F.relu(d_ap - d_an.gather(1, chosen[:, None]).squeeze(1) + self.margin)
        return per_pair.mean(), (per_pair > 0).float().mean().item()
