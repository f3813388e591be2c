"""A two-level softmax head for training on hundreds of thousands to millions of identities.

A flat softmax head over N identities costs, every step, a (batch x N) logit matrix, as
many gradients again and a dense N x d weight gradient: at N = 1M, d = 128 and batch 256
that is several GB on top of the N x d weights. The head here factorises the identity
probability through a fixed grouping g of the identities,

    P(i | x) = P(g(i) | x) * P(i | g(i), x),

a softmax over K groups, then a softmax over the members of one group. Training only needs
each sample's true group, so the loss -log P(g(y) | x) - log P(y | g(y), x) touches the K
group weights and the weight rows of the groups present in the batch (at most batch x N/K
of them): batch x (K + N/K) logits instead of batch x N, least near K = sqrt(N). The
probabilities stay exact (they sum to one over all N), unlike a sampled softmax.
benchmarks/softmax_memory.py measures the memory and time of a step against the flat head.

The groups come from k-means over identity centroid embeddings (each identity's mean
embedding under an existing model), so look-alikes share a group: the group softmax learns
the coarse split and the member softmax compares each sample against the identities it is
most easily confused with, the hard negatives. At inference the right identity may sit in a
group other than the top one, so ``predict`` searches the members of the top-b groups.

The flat baseline is ``losses.NormSoftmax`` (``losses.CosFace`` with a margin).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_CHUNK = 1 << 24  # entries of one (identities x groups) similarity block in k-means


def group_identities(
    centroids: np.ndarray | torch.Tensor, k: int, seed: int = 0, iters: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means: split N identity centroids (N x d) into k groups by cosine.

    Returns the group of every identity (LongTensor (N,)) and the unit-norm mean of each
    group (k x d). Seeds come from greedy k-means++, so well-separated clusters are
    found without restarts. A group left empty gets the identity that fits its own group
    worst, taken from a group that can spare one: every group ends with a member, so the
    two-level head never has an empty softmax. Stops early once the assignment is stable.
    Each iteration costs N x k x d; the seeding about as much again.
    """
    x = torch.as_tensor(centroids)
    x = F.normalize(x if x.is_floating_point() else x.float(), dim=1)
    if not 1 <= k <= len(x):
        raise ValueError(f"need 1 <= k <= {len(x)} identities, got k={k}")
    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(x, k, gen)
    assign = torch.full((len(x),), -1)
    for _ in range(iters):
        previous, (assign, fit) = assign, _nearest(x, centers)
        _fill_empty(assign, fit, k)
        centers = F.normalize(torch.zeros_like(centers).index_add_(0, assign, x), dim=1)
        if torch.equal(assign, previous):
            break
    return assign, centers


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k seeds by greedy k-means++, as scikit-learn does it.

    Each step draws 2 + log k candidates with probability proportional to 1 - cos to the
    nearest seed so far (for unit vectors, half the squared distance) and keeps the one
    that lowers the total most: plain D^2 sampling too often puts two seeds in one
    cluster, which the Lloyd iterations never undo.
    """
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    best = x @ x[chosen[0]]
    for _ in range(k - 1):
        cdf = (1 - best).clamp(min=0).double().cumsum(0)
        if cdf[-1] <= 0:  # every point coincides with a seed; empty groups get filled later
            cdf = torch.arange(1, len(x) + 1, dtype=torch.float64)
        u = torch.rand(trials, dtype=torch.float64, generator=gen) * cdf[-1]
        candidates = torch.searchsorted(cdf, u, right=True).clamp(max=len(x) - 1)
        sims = torch.maximum(best[:, None], x @ x[candidates].T)
        pick = int((1 - sims).sum(0).argmin())
        chosen.append(int(candidates[pick]))
        best = sims[:, pick]
    return x[chosen].clone()


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and cosine to the closest centre for every row, in blocks of bounded size."""
    best = [(block @ centers.T).max(1) for block in x.split(max(1, _CHUNK // len(centers)))]
    return torch.cat([b.indices for b in best]), torch.cat([b.values for b in best])


def _fill_empty(assign: torch.Tensor, fit: torch.Tensor, k: int) -> None:
    """Move into each empty group the worst-fitting identity of a group with two or more (in place)."""
    counts = torch.bincount(assign, minlength=k)
    fit = fit.clone()
    for group in (counts == 0).nonzero().flatten().tolist():
        fit[counts[assign] < 2] = torch.inf
        worst = int(fit.argmin())
        counts[assign[worst]] -= 1
        counts[group] += 1
        assign[worst] = group
        fit[worst] = torch.inf


class TwoLevelSoftmax(nn.Module):
    """Cross-entropy over K groups plus cross-entropy over the members of the sample's group.

    ``assign`` (N,) is the group of every identity (from ``group_identities``); every group
    needs a member. ``group_weight`` (K x d) and ``weight`` (N x d, row i for identity i) are
    trained with the backbone. With ``s`` set the logits are s * cosine between normalised
    feature and weight rows, as in NormFace, and ``m`` subtracts an additive cosine margin
    (CosFace) from the target logit at both levels; without ``s`` they are dot products.

    The identities sorted by group (``order``, with ``offsets`` into it) make each group one
    slice. A step gathers the weight rows of the groups present in the batch, padded to the
    largest of them, and multiplies each group's rows with its own samples only. k-means
    groups are not balanced, so the cost follows the largest group in the batch. With
    ``sparse=True`` the gradient of ``weight`` is a sparse tensor of just those rows (use
    an optimizer that takes sparse gradients: SGD, SparseAdam); otherwise it is a dense
    N x d tensor, as for a flat head.
    """

    def __init__(self, dim: int, assign: torch.Tensor, s: float | None = None, m: float = 0.0,
                 sparse: bool = False):
        super().__init__()
        assign = torch.as_tensor(assign, dtype=torch.long)
        sizes = torch.bincount(assign)
        if (sizes == 0).any():
            raise ValueError(f"groups {(sizes == 0).nonzero().flatten().tolist()} have no identity")
        if m and s is None:
            raise ValueError("a margin needs cosine logits: set s")
        order = torch.argsort(assign, stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        offsets = F.pad(sizes.cumsum(0), (1, 0))
        self.register_buffer("group", assign)
        self.register_buffer("order", order)
        self.register_buffer("offsets", offsets)
        self.register_buffer("rank", position - offsets[assign])  # slot of identity i within its group
        self.group_weight = nn.Parameter(torch.randn(len(sizes), dim).mul_(0.01))
        self.weight = nn.Parameter(torch.randn(len(assign), dim).mul_(0.01))
        self.s = s
        self.m = m
        self.sparse = sparse

    def _logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (..., n, d) against rows w (..., M, d) -> (..., n, M)."""
        if self.s is None:
            return x @ w.transpose(-1, -2)
        # divide the dot products by the row norms rather than normalise the gathered rows: no copy of them
        norm = torch.linalg.vector_norm(w, dim=-1).clamp(min=1e-12)
        return self.s * (F.normalize(x, dim=-1) @ w.transpose(-1, -2)) / norm.unsqueeze(-2)

    def _with_margin(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.m:
            return logits
        return logits.scatter_add(1, target[:, None], logits.new_full((len(target), 1), -self.s * self.m))

    def group_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.group_weight)

    def member_logits(self, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of each row of x (n, d) against the members of its group (groups (n,)).

        Returns logits (n, M), M the largest of these groups, with -inf in padding slots,
        and the identity in each slot (n, M). Slot j of a group is its j-th identity in
        ``order``, so identity i is in slot ``rank[i]``.
        """
        present, which = torch.unique(groups, return_inverse=True)
        start = self.offsets[present]
        size = self.offsets[present + 1] - start
        slots = torch.arange(int(size.max()), device=x.device)
        members = self.order[start[:, None] + torch.minimum(slots, size[:, None] - 1)]  # padding repeats the last
        w = F.embedding(members, self.weight, sparse=self.sparse)  # (groups present, M, d)

        # the rows of each group side by side, padded to the most rows in one group: (groups present, S, d)
        count = torch.bincount(which, minlength=len(present))
        by_group = torch.argsort(which, stable=True)
        row_slot = torch.empty_like(which)
        row_slot[by_group] = torch.arange(len(which), device=x.device) - (count.cumsum(0) - count)[which[by_group]]
        grouped = x.new_zeros(len(present), int(count.max()), x.shape[1]).index_put((which, row_slot), x)

        logits = self._logits(grouped, w)[which, row_slot]
        return logits.masked_fill(slots >= size[which, None], -torch.inf), members[which]

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        groups, slot = self.group[labels], self.rank[labels]
        group_loss = F.cross_entropy(self._with_margin(self.group_logits(x), groups), groups)
        logits, _ = self.member_logits(x, groups)
        return group_loss + F.cross_entropy(self._with_margin(logits, slot), slot)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log P(i | x) for all N identities, (batch, N); builds batch x N logits, so for small N."""
        group_lp = self.group_logits(x).log_softmax(1)
        logits = self._logits(x, self.weight)
        index = self.group.expand_as(logits)
        top = torch.full_like(group_lp, -torch.inf).scatter_reduce(1, index, logits, "amax")[:, self.group]
        within = torch.zeros_like(group_lp).scatter_add(1, index, (logits - top).exp())[:, self.group]
        return group_lp[:, self.group] + logits - top - within.log()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, beam: int = 1) -> torch.Tensor:
        """The most probable identity per row among the members of its top-``beam`` groups."""
        beam = min(beam, len(self.group_weight))
        group_lp, top = self.group_logits(x).log_softmax(1).topk(beam, dim=1)
        rows = torch.arange(len(x), device=x.device).repeat_interleave(beam)
        logits, members = self.member_logits(x[rows], top.flatten())
        score = group_lp.reshape(-1, 1) + logits.log_softmax(1)
        best = score.view(len(x), -1).argmax(1)
        return members.view(len(x), -1).gather(1, best[:, None]).squeeze(1)
