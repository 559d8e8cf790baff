"""heads/losses.py against values written out by hand from the formulas of docs/method.md, "Losses and the
two-step (semi-push-pull) update"."""
import math

import pytest
import torch

from heads.losses import cross_supcon, pull_gate, should_pull, supcon

E = math.e


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def supcon_by_hand(z, labels, tau, official=False):
    """docs/method.md's SupCon written out with math: one row at a time, one term at a time."""
    z = [[v / math.hypot(*row) for v in row] for row in z]
    b = len(z)
    total = 0.0
    for i in range(b):
        sim = [sum(a * c for a, c in zip(z[i], z[j])) / tau for j in range(b)]
        den = sum(math.exp(sim[j]) for j in range(b) if j != i)
        if official:
            den += math.exp(0.0)  # self logit set to 0 and kept
        pos = [j for j in range(b) if j != i and labels[j] == labels[i]]
        if pos:
            total += sum(math.log(math.exp(sim[p]) / den) for p in pos) / len(pos)
    return -total / b


def test_supcon_closed_form_with_lone_class_member():
    # z1 = z2 = (1, 0) share label 0; z3 = (0, 1) is alone in class 1; tau = 1.
    # rows 1, 2: positive logit 1, denominator e^1 + e^0; row 3 has no positive -> 0,
    # but still counts in the mean over the 3 rows.
    z, y = t([[1, 0], [2, 0], [0, 3]]), torch.tensor([0, 0, 1])
    expected = 2 / 3 * math.log((E + 1) / E)
    assert supcon(z, y, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)


def test_supcon_official_keeps_self_with_logit_zero():
    z, y = t([[1, 0], [2, 0], [0, 3]]), torch.tensor([0, 0, 1])
    # official: the self term e^0 joins each denominator: e + 1 + 1
    expected = 2 / 3 * math.log((E + 2) / E)
    got = supcon(z, y, temperature=1.0, official=True).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > supcon(z, y, temperature=1.0).item()  # a larger denominator, a larger loss


@pytest.mark.parametrize("official", [False, True])
def test_supcon_matches_formula_on_random_batch(official):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3])  # class 2 and 3 have one member each
    expected = supcon_by_hand(z.tolist(), y.tolist(), 0.5, official)
    assert supcon(z, y, 0.5, official).item() == pytest.approx(expected, rel=1e-10)


def test_supcon_no_positive_pairs_is_zero_with_finite_grad():
    z = torch.randn(3, 4, requires_grad=True)
    loss = supcon(z, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_supcon_default_temperature_is_stable_and_scale_free():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 8, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    a, b = supcon(z, y), supcon(1000 * z, y)  # tau = 0.07, logits up to 14
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-5)


def test_cross_supcon_closed_forms_include_the_diagonal():
    eye = t([[1, 0], [0, 1]])
    # distinct labels: each image's only positive is its own text (the diagonal)
    assert cross_supcon(eye, eye, torch.tensor([0, 1]), 1.0).item() == pytest.approx(
        math.log((E + 1) / E), rel=1e-12)
    # same label: positives are both texts, log(e/(e+1)) and log(1/(e+1)) averaged
    assert cross_supcon(eye, eye, torch.tensor([0, 0]), 1.0).item() == pytest.approx(
        math.log(E + 1) - 0.5, rel=1e-12)


def test_cross_supcon_matches_formula_on_random_batch():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(5, 3, generator=g, dtype=torch.float64)
    txt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = [0, 1, 1, 2, 0]
    norm = lambda v: [x / math.sqrt(sum(c * c for c in v)) for x in v]  # noqa: E731
    ii, tt = [norm(r) for r in img.tolist()], [norm(r) for r in txt.tolist()]
    total = 0.0
    for i in range(5):  # Eq. 7, L_clm(T, I, y): text i is the anchor, against every image j
        sim = [sum(a * b for a, b in zip(tt[i], ii[j])) / 0.3 for j in range(5)]
        den = sum(math.exp(s) for s in sim)  # all j, the pair itself included
        pos = [j for j in range(5) if y[j] == y[i]]  # diagonal included
        total += sum(math.log(math.exp(sim[p]) / den) for p in pos) / len(pos)
    got = cross_supcon(txt, img, torch.tensor(y), 0.3).item()
    assert got == pytest.approx(-total / 5, rel=1e-10)
    # anchors are texts: swapping the modalities is a different loss
    assert cross_supcon(img, txt, torch.tensor(y), 0.3).item() != pytest.approx(got)


def test_gate_opens_when_pairs_do_not_stand_out():
    # T_a = 0: S is 0.5 everywhere, d = 0.5, no entry is strictly below d -> c = 0
    text, image = torch.zeros(4, 2), torch.randn(4, 2)
    labels = torch.tensor([0, 1, 2, 0])
    assert pull_gate(text, image, labels) == (0, 6)  # 4 diagonal + (0,3) + (3,0)
    assert should_pull(text, image, labels, alpha=2 / 3)


def test_gate_closes_when_pairs_are_aligned():
    # matched pairs score sigmoid(25) ~ 1, mismatched sigmoid(0) = 0.5 < d
    image = 5 * torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    assert pull_gate(image.clone(), image, labels) == (6, 3)
    assert not should_pull(image.clone(), image, labels, alpha=2 / 3)


def test_gate_counts_the_diagonal_in_c_mask():
    # distinct labels: c_mask = B only because the diagonal counts; with c = 0 the gate
    # opens (0 < 2/3 * 3); without the diagonal it would be 0 < 0 and stay shut
    text, image = torch.zeros(3, 2), torch.ones(3, 2)
    assert pull_gate(text, image, torch.tensor([0, 1, 2])) == (0, 3)
    assert should_pull(text, image, torch.tensor([0, 1, 2]))


def test_gate_is_strict_at_the_threshold():
    image = 5 * torch.eye(3)
    labels = torch.tensor([0, 0, 1])  # c_mask = 5; c = 6 (see above)
    c, c_mask = pull_gate(image, image, labels)
    assert (c, c_mask) == (6, 5)
    assert not should_pull(image, image, labels, alpha=6 / 5)  # 6 < 6 is false
    assert should_pull(image, image, labels, alpha=6 / 5 + 1e-6)


def test_official_gate_floor_skips_at_the_rounded_boundary():
    """The official code skips when c >= int(2/3 * c_mask): at c == floor(2/3 c_mask) the paper's
    gate (c < 2/3 c_mask) pulls, the official one does not."""
    torch.manual_seed(0)
    for _ in range(200):
        text, image = torch.randn(5, 4), torch.randn(5, 4)
        labels = torch.randint(0, 2, (5,))
        c, m = pull_gate(text, image, labels)
        assert should_pull(text, image, labels, 2 / 3) == (c < 2 / 3 * m)
        assert should_pull(text, image, labels, 2 / 3, floor=True) == (c < int(2 / 3 * m))
    # a hand-made boundary: c_mask = 13 (labels 0,0,0,1,1 -> 9 + 4), floor(26/3) = 8
    labels = torch.tensor([0, 0, 0, 1, 1])
    image = torch.eye(5, 4)
    for text in (torch.randn(5, 4) for _ in range(500)):
        c, m = pull_gate(text, image, labels)
        if c == 8:
            assert m == 13 and should_pull(text, image, labels, 2 / 3) and not should_pull(text, image, labels, 2 / 3, floor=True)
            break
    else:
        pytest.fail("no batch with c == 8 found")
