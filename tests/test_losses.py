import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import AffinityLoss, ContrastiveLoss, CosineLoss, DistillLoss, Embeddings, MSELoss, SmoothL1Loss

E = torch.eye(4)


def test_cosine_values():
    assert CosineLoss()(Embeddings(s_img=E, t_img=E)).item() == pytest.approx(0.0, abs=1e-6)
    assert CosineLoss()(Embeddings(s_img=E, t_img=-E)).item() == pytest.approx(2.0)
    # orthogonal rows -> 1; scale of the student does not matter
    assert CosineLoss()(Embeddings(s_img=3 * E, t_img=E.roll(1, 0))).item() == pytest.approx(1.0)
    # image and text terms are averaged
    v = CosineLoss()(Embeddings(s_img=E, t_img=E, s_txt=E, t_txt=-E)).item()
    assert v == pytest.approx(1.0)


def test_mse_and_smooth_l1_values():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert MSELoss()(Embeddings(s_img=s, t_img=t)).item() == pytest.approx(1.0)  # mean of 1 and 1
    # |d| = 1 > beta=0.5 -> |d| - beta/2 = 0.75 per element
    assert SmoothL1Loss(beta=0.5)(Embeddings(s_img=s, t_img=t)).item() == pytest.approx(0.75)
    # |d| = 0.2 < beta=1 -> 0.5 d^2 / beta = 0.02 per element
    s2 = torch.tensor([[1.0, 0.0]])
    t2 = torch.tensor([[0.8, 0.6]])
    assert SmoothL1Loss(beta=1.0)(Embeddings(s_img=s2, t_img=t2)).item() == pytest.approx((0.02 + 0.18) / 2)


def test_contrastive_closed_form():
    n, tau = 4, 0.5
    loss = ContrastiveLoss(init_temperature=tau, learnable=False)
    # student image i == teacher text i, orthogonal to the others: logits = 1/tau on the diagonal, 0 elsewhere
    v = loss(Embeddings(s_img=E, t_txt=E, t_img=E)).item()
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (n - 1)))
    assert v == pytest.approx(expected, rel=1e-5)
    # wrong pairing is much worse
    assert loss(Embeddings(s_img=E.roll(1, 0), t_txt=E)).item() > expected + 1.5
    assert isinstance(ContrastiveLoss().logit_scale, torch.nn.Parameter)


def test_affinity_values():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ref = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert AffinityLoss()(Embeddings(s_img=a, t_img=a, t_txt=ref)).item() == pytest.approx(0.0, abs=1e-6)
    # 2 rows, tau=1: hand-computed KL(p_t || p_s)
    s, t, r = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.eye(2)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = float((p * (p.log() - p.flip(0).log())).sum())
    assert AffinityLoss(tau=1.0)(Embeddings(s_img=s, t_img=t, t_txt=r)).item() == pytest.approx(kl, rel=1e-5)


def test_weighted_sum_and_errors():
    e = Embeddings(s_img=E, t_img=-E, t_txt=E)
    total, terms = DistillLoss({"cosine": 0.5, "mse": 2.0})(e)
    assert terms["cosine"] == pytest.approx(2.0)
    assert terms["mse"] == pytest.approx(4 / 4 * 1.0)  # ((1 - -1)^2 on one of 4 dims) averaged = 1.0
    assert total.item() == pytest.approx(0.5 * 2.0 + 2.0 * 1.0)
    with pytest.raises(KeyError, match="cosine"):
        DistillLoss({"cosin": 1.0})
    with pytest.raises(ValueError, match="every weight is zero"):
        DistillLoss({"cosine": 0.0})


def test_contrastive_queue_adds_cached_negatives():
    from distill.losses import ContrastiveLoss, Embeddings

    torch.manual_seed(0)
    loss = ContrastiveLoss(queue=6)
    t_txt = F.normalize(torch.randn(4, 8), dim=-1)
    s_img = t_txt + 0.3 * torch.randn(4, 8)
    first = loss(Embeddings(s_img=s_img, t_txt=t_txt))
    assert loss._queues[0].emb.shape == (4, 8)
    # a row's own reference in the queue (a repeated caption) is masked, not a false negative
    prompt = t_txt[:1].repeat(4, 1)
    q = ContrastiveLoss(queue=8)
    q(Embeddings(s_img=s_img, t_txt=prompt))
    assert torch.allclose(q(Embeddings(s_img=s_img, t_txt=prompt)), ContrastiveLoss()(Embeddings(s_img=s_img, t_txt=prompt)))
    other = F.normalize(torch.randn(4, 8), dim=-1)
    loss(Embeddings(s_img=other, t_txt=other))
    assert loss._queues[0].emb.shape == (6, 8)  # FIFO capped at the queue size, newest first
    assert torch.allclose(loss._queues[0].emb[:4], other)
    harder = loss(Embeddings(s_img=s_img, t_txt=t_txt))
    assert harder > first  # more negatives
    no_queue = ContrastiveLoss()
    assert torch.allclose(no_queue(Embeddings(s_img=s_img, t_txt=t_txt)), first)
