"""Two-level softmax against its formula on tiny tensors, k-means grouping, and a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.losses import CosFace, NormSoftmax  # noqa: E402
from training.two_level import TwoLevelSoftmax, group_identities  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def np_logits(x: np.ndarray, w: np.ndarray, s: float | None) -> np.ndarray:
    if s is None:
        return w @ x
    return s * (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (x / np.linalg.norm(x))


def reference_loss(x, group_w, w, assign, labels, s=None, m=0.0) -> float:
    """mean over samples of -log P(g(y)) - log P(y | g(y)), one sample at a time."""
    total = 0.0
    for xi, yi in zip(x, labels):
        g = assign[yi]
        members = list(np.flatnonzero(assign == g))
        group_logits = np_logits(xi, group_w, s)
        member_logits = np_logits(xi, w[members], s)
        if m:
            group_logits[g] -= s * m
            member_logits[members.index(yi)] -= s * m
        total -= np_log_softmax(group_logits)[g] + np_log_softmax(member_logits)[members.index(yi)]
    return total / len(labels)


def head(group_w, w, assign, **kwargs) -> TwoLevelSoftmax:
    module = TwoLevelSoftmax(w.shape[1], torch.as_tensor(assign), **kwargs).double()
    with torch.no_grad():
        module.group_weight.copy_(torch.as_tensor(group_w))
        module.weight.copy_(torch.as_tensor(w))
    return module


# 7 identities in 3 groups of sizes 3, 1, 3, not sorted by group; the batch has two samples of group 2,
# one of group 1 (a singleton) and one of group 0
ASSIGN = np.array([2, 0, 2, 1, 0, 2, 0])
GW = np.array([[0.5, -1.0, 0.3], [1.0, 0.2, -0.4], [-0.3, 0.8, 1.1]])
W = np.array([[1.0, 0.0, 0.5], [0.2, -1.0, 0.3], [-2.0, 0.4, 1.0], [0.3, 0.3, -0.9],
              [0.7, -0.6, 0.1], [-0.5, -0.5, 0.8], [1.2, 0.9, -0.2]])
X = np.array([[0.5, -1.0, 2.0], [3.0, 0.2, 0.1], [-0.4, 0.9, -1.5], [0.6, 0.6, 0.6]])
Y = np.array([5, 0, 3, 4])


def test_loss_on_hand_computed_example():
    # group logits x.G: sample 0 -> (0, 1), sample 1 -> (0, 0); group 1 = identities {1, 2}, group 0 = {0}
    group_w = np.array([[0.0, 0.0], [1.0, 0.0]])
    w = np.array([[5.0, 5.0], [0.0, 0.0], [2.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss = head(group_w, w, np.array([0, 1, 1]))(x, torch.tensor([2, 0]))
    # sample 0: -log(e / (1 + e)) - log(e^2 / (1 + e^2)); sample 1: -log(1/2) - log(1)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("s, m", [(None, 0.0), (10.0, 0.0), (10.0, 0.35)])
def test_loss_matches_formula(s, m):
    loss = head(GW, W, ASSIGN, s=s, m=m)(torch.from_numpy(X), torch.from_numpy(Y))
    assert loss.item() == pytest.approx(reference_loss(X, GW, W, ASSIGN, Y, s, m), rel=1e-12)


@pytest.mark.parametrize("s", [None, 10.0])
def test_log_prob_is_a_distribution_whose_nll_is_the_loss(s):
    module = head(GW, W, ASSIGN, s=s)
    x = torch.from_numpy(X)
    log_prob = module.log_prob(x)
    assert log_prob.shape == (4, 7)
    np.testing.assert_allclose(log_prob.exp().sum(1).detach().numpy(), 1.0, rtol=1e-12)
    nll = -log_prob[torch.arange(4), torch.from_numpy(Y)].mean()
    assert nll.item() == pytest.approx(module(x, torch.from_numpy(Y)).item(), rel=1e-12)


def test_log_prob_stays_finite_when_groups_are_far_apart_in_logit():
    # s = 64: group 1's logits sit ~128 below group 0's, where exp of the gap underflows float32
    assign = torch.tensor([0, 0, 1, 1])
    module = TwoLevelSoftmax(2, assign, s=64.0)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, -0.1]]))
    log_prob = module.log_prob(torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(log_prob).all()
    assert log_prob.exp().sum().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "s, m, flat",
    [
        (None, 0.0, None),
        (10.0, 0.0, lambda: NormSoftmax(7, 3, s=10.0)),
        (10.0, 0.35, lambda: CosFace(7, 3, m=0.35, s=10.0)),
    ],
)
def test_single_group_is_the_flat_softmax(s, m, flat):
    module = head(GW[:1], W, np.zeros(7, dtype=np.int64), s=s, m=m)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    if flat is None:
        expected = torch.nn.functional.cross_entropy(x @ torch.from_numpy(W).T, y)
    else:
        flat_loss = flat().double()
        with torch.no_grad():
            flat_loss.weight.copy_(torch.from_numpy(W))
        expected = flat_loss(x, y)
    assert module(x, y).item() == pytest.approx(expected.item(), rel=1e-12)


def test_predict_searches_the_top_groups():
    module = head(GW, W, ASSIGN, s=10.0)
    x = torch.from_numpy(X)
    # beam over every group: the argmax of the full distribution
    assert torch.equal(module.predict(x, beam=3), module.log_prob(x).argmax(1))
    # beam 1: the best member of the best group, by hand
    top_group = (x @ torch.from_numpy(GW / np.linalg.norm(GW, axis=1, keepdims=True)).T).argmax(1)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(torch.from_numpy(W), dim=1).T
    in_top = torch.from_numpy(ASSIGN)[None, :] == top_group[:, None]
    assert torch.equal(module.predict(x, beam=1), cos.masked_fill(~in_top, -2).argmax(1))


def test_predict_beam_recovers_identity_outside_top_group():
    # the sample sits between the two group weights; its own identity is in the runner-up group
    assign = torch.tensor([0, 0, 1, 1])
    module = head(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 10.0]]),
                  assign.numpy())
    x = torch.tensor([[1.0, 0.9]], dtype=torch.float64)
    # P(g0) = e / (e + e^0.9) = 0.52 but P(3 | g1) ~ 1 while P(i | g0) ~ 1/2
    assert module.predict(x, beam=1).item() == 0
    assert module.predict(x, beam=2).item() == 3
    assert module.log_prob(x).argmax().item() == 3


def test_sparse_and_dense_gradients_agree():
    grads = []
    for sparse in (False, True):
        module = head(GW, W, ASSIGN, s=10.0, m=0.2, sparse=sparse)
        x = torch.from_numpy(X).requires_grad_()
        module(x, torch.from_numpy(Y)).backward()
        weight_grad = module.weight.grad.to_dense() if sparse else module.weight.grad
        grads.append((weight_grad, module.group_weight.grad, x.grad))
    assert grads[1][0].abs().sum() > 0
    for dense, sparse in zip(*grads):
        np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-12, atol=1e-12)
    # only rows of the batch's groups get a gradient: group 2 = {0, 2, 5} and group 1 = {3}, padded to 3 slots
    module = head(GW, W, ASSIGN, sparse=True)
    module(torch.from_numpy(X[:2]), torch.tensor([0, 3])).backward()
    assert module.weight.grad.coalesce().indices().flatten().tolist() == [0, 2, 3, 5]


def test_rejects_empty_group_and_margin_without_scale():
    with pytest.raises(ValueError, match="no identity"):
        TwoLevelSoftmax(3, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="margin"):
        TwoLevelSoftmax(3, torch.tensor([0, 1]), m=0.3)


def separated_clusters(n_clusters: int, per_cluster: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_clusters]  # orthonormal
    truth = np.repeat(np.arange(n_clusters), per_cluster)
    points = directions[truth] + spread * rng.normal(size=(len(truth), dim))
    order = rng.permutation(len(truth))
    return points[order], truth[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_clusters(seed):
    points, truth = separated_clusters(8, 25, 16, spread=0.05, seed=seed)
    assign, centers = group_identities(points, 8, seed=seed)
    assert assign.dtype == torch.long and assign.shape == (200,)
    # a bijection between true clusters and groups
    pairs = set(zip(truth.tolist(), assign.tolist()))
    assert len(pairs) == 8 and len({t for t, _ in pairs}) == 8 and len({g for _, g in pairs}) == 8
    np.testing.assert_allclose(centers.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_kmeans_converges_to_a_fixed_point():
    # on unclustered data: every identity ends nearest its own group's centre, which is its group's mean direction
    points = np.random.default_rng(0).normal(size=(300, 8))
    assign, centers = group_identities(points, 10, iters=100)
    unit = torch.nn.functional.normalize(torch.from_numpy(points), dim=1)
    assert torch.equal((unit @ centers.T).argmax(1), assign)
    means = torch.zeros(10, 8, dtype=torch.float64).index_add_(0, assign, unit)
    np.testing.assert_allclose(centers.numpy(), torch.nn.functional.normalize(means, dim=1).numpy(), atol=1e-12)


def test_kmeans_fills_empty_groups():
    # 3 distinct points, each 4 times: 6 groups cannot all win a point by distance
    points = np.repeat(np.eye(3, 5), 4, axis=0)
    assign, centers = group_identities(points, 6)
    counts = torch.bincount(assign, minlength=6)
    assert len(counts) == 6 and (counts > 0).all()
    # every group's centre is the mean direction of its members
    np.testing.assert_allclose(centers[assign].numpy(), points, atol=1e-12)


def test_kmeans_rejects_more_groups_than_identities():
    with pytest.raises(ValueError):
        group_identities(np.eye(3), 4)


def test_two_level_head_trains_and_predicts():
    # 200 identities in 10 families of look-alikes; each identity's centroid from its training samples
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    families = torch.nn.functional.normalize(torch.randn(10, 16, generator=gen), dim=1)
    centres = families.repeat_interleave(20, 0) + 0.3 * torch.randn(200, 16, generator=gen)
    labels = torch.arange(200).repeat_interleave(8)
    samples = centres[labels] + 0.08 * torch.randn(len(labels), 16, generator=gen)
    train, test = torch.arange(len(labels)) % 8 < 6, torch.arange(len(labels)) % 8 >= 6
    identity_means = torch.zeros(200, 16).index_add_(0, labels[train], samples[train]) / 6

    assign, _ = group_identities(identity_means, 14)
    model = torch.nn.Linear(16, 16)
    loss_fn = TwoLevelSoftmax(16, assign, s=16.0)
    params = [*model.parameters(), *loss_fn.parameters()]
    x_train, y_train = samples[train], labels[train]
    losses = []
    for _ in range(300):  # plain SGD by hand: torch.optim's first use imports torch._dynamo, which takes seconds
        batch = torch.randint(len(y_train), (64,), generator=gen)
        loss = loss_fn(model(x_train[batch]), y_train[batch])
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
        losses.append(loss.item())

    start, end = np.mean(losses[:10]), np.mean(losses[-20:])
    assert end < 0.1 * start
    accuracy = (loss_fn.predict(model(samples[test]), beam=3) == labels[test]).float().mean().item()
    assert accuracy > 0.8  # chance is 1/200; even a perfect group guess gets 1/14 of the members
