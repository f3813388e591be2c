"""Each loss against its formula on tiny tensors; expected values come from numpy/math here."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.losses import (  # noqa: E402
    ArcFace,
    CenterLoss,
    CosFace,
    NormSoftmax,
    SoftmaxCenterLoss,
    SoftmaxLoss,
    SphereFace,
    TripletLoss,
)


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_prob[np.arange(len(labels)), labels].mean())


def np_cosines(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def with_weight(loss, w: np.ndarray):
    loss = loss.double()
    with torch.no_grad():
        loss.weight.copy_(torch.from_numpy(w))
    return loss


X = np.array([[0.5, -1.0, 2.0], [3.0, 0.2, 0.1], [-0.4, 0.9, -1.5]])
W = np.array([[1.0, 0.0, 0.5], [0.2, -1.0, 0.3], [-2.0, 0.4, 1.0], [0.3, 0.3, -0.9]])
Y = np.array([2, 0, 3])


def test_norm_softmax_is_scaled_cosine_cross_entropy():
    loss = with_weight(NormSoftmax(4, 3, s=10.0), W)
    expected_logits = 10.0 * np_cosines(X, W)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    np.testing.assert_allclose(loss.logits(x, y).detach().numpy(), expected_logits, rtol=1e-12)
    assert loss(x, y).item() == pytest.approx(np_cross_entropy(expected_logits, Y), rel=1e-12)


def test_cosface_subtracts_margin_from_target_logit_only():
    loss = with_weight(CosFace(4, 3, m=0.35, s=64.0), W)
    expected_logits = 64.0 * np_cosines(X, W)
    expected_logits[np.arange(3), Y] -= 64.0 * 0.35
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    np.testing.assert_allclose(loss.logits(x, y).detach().numpy(), expected_logits, rtol=1e-12)
    assert loss(x, y).item() == pytest.approx(np_cross_entropy(expected_logits, Y), rel=1e-12)


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_arcface_known_angles_including_fallback_past_pi_minus_m():
    m, s = 0.5, 64.0
    class_angles = [0.0, math.pi / 2, math.pi, 3 * math.pi / 2]
    w = np.array([unit(a) for a in class_angles])
    # (feature angle, label): target angles 0.3 and 1.0 get cos(t + m); 2.9 > pi - m uses the fallback.
    samples = [(0.3, 0), (math.pi / 2 + 1.0, 1), (2.9, 0)]
    x = 2.0 * np.array([unit(a) for a, _ in samples])
    y = np.array([label for _, label in samples])

    expected = np.empty((3, 4))
    for i, (angle, label) in enumerate(samples):
        for j, class_angle in enumerate(class_angles):
            expected[i, j] = s * math.cos(angle - class_angle)
    expected[0, 0] = s * math.cos(0.3 + m)
    expected[1, 1] = s * math.cos(1.0 + m)
    expected[2, 0] = s * (math.cos(2.9) - m * math.sin(m))

    loss = with_weight(ArcFace(4, 2, m=m, s=s), w)
    got = loss.logits(torch.from_numpy(x), torch.from_numpy(y)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert loss(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(np_cross_entropy(expected, y))


def test_arcface_target_logit_decreases_over_whole_angle_range():
    t = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    target = ArcFace(2, 2).margin(torch.cos(t))
    assert (target.diff() < 0).all()


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_psi_matches_formula_and_decreases(m):
    t = np.linspace(0, math.pi, 2001)
    k = np.floor(m * t / math.pi)
    expected = (-1.0) ** k * np.cos(m * t) - 2 * k
    psi = SphereFace(2, 2, m=m).psi(torch.from_numpy(np.cos(t))).numpy()
    np.testing.assert_allclose(psi, expected, atol=1e-6)
    assert (np.diff(psi) < 0).all()


def test_sphereface_target_logit_with_annealing_weight():
    m, s, lam, t = 4, 30.0, 5.0, 1.0  # m t / pi = 1.27, so k = 1: psi = -cos(4) - 2
    w = np.array([unit(0.0), unit(math.pi / 2), unit(math.pi)])
    x = np.array([unit(t)])
    loss = with_weight(SphereFace(3, 2, m=m, s=s, lam=lam), w)
    got = loss.logits(torch.from_numpy(x), torch.tensor([0])).detach().numpy()[0]
    psi = -math.cos(4 * t) - 2
    expected = [s * (lam * math.cos(t) + psi) / (1 + lam), s * math.cos(t - math.pi / 2), s * math.cos(math.pi - t)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_sphereface_rejects_non_integer_margin():
    with pytest.raises(ValueError):
        SphereFace(2, 2, m=1.5)


@pytest.mark.parametrize("cls", [NormSoftmax, CosFace, ArcFace, SphereFace])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_gradients_finite_when_feature_is_parallel_to_its_class_weight(cls, dtype):
    # the last row makes the float32 cosine of w with 2 * w round to slightly above 1
    w = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0], [2.5672328, -0.4731198, 0.3355508]], dtype=dtype)
    loss = cls(4, 3).to(dtype)
    with torch.no_grad():
        loss.weight.copy_(w)
    # same direction as the class weight: cos = 1; opposite: cos = -1
    x = torch.stack([2 * w[0], -3 * w[1], 2.5 * w[2], 2 * w[3]]).requires_grad_()
    value = loss(x, torch.tensor([0, 1, 2, 3]))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.weight.grad).all()


def test_softmax_loss_is_linear_layer_then_cross_entropy():
    loss = SoftmaxLoss(4, 3).double()
    bias = np.array([0.1, -0.2, 0.0, 0.3])
    with torch.no_grad():
        loss.fc.weight.copy_(torch.from_numpy(W))
        loss.fc.bias.copy_(torch.from_numpy(bias))
    expected = np_cross_entropy(X @ W.T + bias, Y)
    assert loss(torch.from_numpy(X), torch.from_numpy(Y)).item() == pytest.approx(expected, rel=1e-12)


CENTERS = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
CX = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
CY = np.array([0, 0, 2])


def center_loss(lambda_=0.1, alpha=0.5):
    loss = CenterLoss(3, 2, lambda_=lambda_, alpha=alpha).double()
    loss.centers.copy_(torch.from_numpy(CENTERS))
    return loss


def test_center_loss_value_gradient_and_paper_update():
    loss = center_loss()
    x = torch.from_numpy(CX).requires_grad_()
    value = loss(x, torch.from_numpy(CY))
    # squared distances 1, 4, 4: 0.1 * 1/2 * 9 / 3
    assert value.item() == pytest.approx(0.15, rel=1e-12)
    value.backward()
    np.testing.assert_allclose(x.grad.numpy(), 0.1 * (CX - CENTERS[CY]) / 3, rtol=1e-12)
    # c0 (two samples): (0,0) - 0.5 * ((0,0)-(1,0) + (0,0)-(0,2)) / 3 = (1/6, 1/3)
    # c1 (absent) stays; c2 (one sample): (2,0) - 0.5 * ((2,0)-(4,0)) / 2 = (2.5, 0)
    expected_centers = np.array([[1 / 6, 1 / 3], [1.0, 1.0], [2.5, 0.0]])
    np.testing.assert_allclose(loss.centers.numpy(), expected_centers, rtol=1e-12)
    assert not any(p is loss.centers for p in loss.parameters())


def test_center_loss_leaves_centres_alone_in_eval_mode():
    loss = center_loss().eval()
    loss(torch.from_numpy(CX), torch.from_numpy(CY))
    np.testing.assert_array_equal(loss.centers.numpy(), CENTERS)


def test_softmax_center_loss_adds_both_terms():
    loss = SoftmaxCenterLoss(3, 2, lambda_=0.1, alpha=0.5).double()
    fc_w, fc_b = np.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 2.0]]), np.array([0.0, 0.1, -0.1])
    with torch.no_grad():
        loss.softmax.fc.weight.copy_(torch.from_numpy(fc_w))
        loss.softmax.fc.bias.copy_(torch.from_numpy(fc_b))
        loss.center.centers.copy_(torch.from_numpy(CENTERS))
    expected = np_cross_entropy(CX @ fc_w.T + fc_b, CY) + 0.15
    assert loss(torch.from_numpy(CX), torch.from_numpy(CY)).item() == pytest.approx(expected, rel=1e-12)


def line(points: list[float]) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float64)[:, None]


def test_triplet_picks_semi_hard_negative_not_hardest():
    # anchor 0 / positive 0.3 (d = 0.09); negatives -0.2 (d = 0.04, hard), 0.5 (d = 0.25, semi-hard)
    x = line([0.0, 0.3, 0.5, -0.2])
    labels = torch.tensor([0, 0, 1, 1])
    value, active = TripletLoss(margin=0.2)(x, labels)
    # (0,1) and (1,0): semi-hard negative at d = 0.25 -> 0.09 - 0.25 + 0.2 = 0.04 each
    # (2,3) and (3,2): d(a,p) = 0.49, both negatives closer -> farthest (d = 0.25): 0.44 each
    assert value.item() == pytest.approx((0.04 + 0.04 + 0.44 + 0.44) / 4)
    assert active == 1.0


def test_triplet_falls_back_to_easy_negative_and_counts_active_pairs():
    # a far singleton (label 2) is the only negative beyond d(a,p) for the pairs of label 1
    x = line([0.0, 0.3, 0.5, -0.2, 3.0])
    labels = torch.tensor([0, 0, 1, 1, 2])
    value, active = TripletLoss(margin=0.2)(x, labels)
    assert value.item() == pytest.approx((0.04 + 0.04 + 0.0 + 0.0) / 4)
    assert active == 0.5


def reference_triplet(x: np.ndarray, labels: np.ndarray, margin: float) -> tuple[float, float]:
    losses = []
    for a in range(len(x)):
        negatives = [n for n in range(len(x)) if labels[n] != labels[a]]
        if not negatives:
            continue
        for p in range(len(x)):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = float(np.sum((x[a] - x[p]) ** 2))
            d_an = {n: float(np.sum((x[a] - x[n]) ** 2)) for n in negatives}
            beyond = [n for n in negatives if d_an[n] > d_ap]
            n = min(beyond, key=d_an.get) if beyond else max(negatives, key=d_an.get)
            losses.append(max(0.0, d_ap - d_an[n] + margin))
    return float(np.mean(losses)), float(np.mean([v > 0 for v in losses]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_loop_reference_on_random_unit_embeddings(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(12, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=12)
    value, active = TripletLoss(margin=0.2)(torch.from_numpy(x), torch.from_numpy(labels))
    expected_value, expected_active = reference_triplet(x, labels, 0.2)
    assert value.item() == pytest.approx(expected_value, rel=1e-9, abs=1e-12)
    assert active == pytest.approx(expected_active)


def test_triplet_without_positive_pairs_is_zero_but_differentiable():
    x = line([0.0, 1.0, 2.0]).requires_grad_()
    value, active = TripletLoss()(x, torch.tensor([0, 1, 2]))
    value.backward()
    assert value.item() == 0.0 and active == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormSoftmax(4, 3),
        lambda: CosFace(4, 3),
        lambda: ArcFace(4, 3),
        lambda: SphereFace(4, 3),
        lambda: SoftmaxLoss(4, 3),
        lambda: SoftmaxCenterLoss(4, 3),
        lambda: TripletLoss(),
    ],
)
def test_gradients_reach_features(make):
    torch.manual_seed(0)
    loss = make()
    x = torch.nn.functional.normalize(torch.randn(8, 3), dim=1).requires_grad_()
    value = loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    value = value[0] if isinstance(value, tuple) else value
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
