"""Optimiser: parameter groups, clipping and Lookahead."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from virtex_d2.solver import LookaheadSGD, virtex_param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.textual_head = nn.Module()
        self.textual_head.transformer = nn.Module()
        self.textual_head.transformer.norm1 = nn.LayerNorm(4)
        self.textual_head.transformer.linear = nn.Linear(4, 2)


def test_param_groups_split_lr_and_decay():
    model = Toy()
    groups = virtex_param_groups(
        model,
        0.2,
        0.001,
        1e-4,
        r"^textual_head\.(embedding|transformer|backward_transformer)\.\S*(norm|bias)",
    )
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["backbone.weight"])] == (0.2, 1e-4)
    assert by_param[id(named["backbone.bias"])] == (0.2, 1e-4)
    assert by_param[id(named["textual_head.transformer.norm1.weight"])] == (0.001, 0.0)
    assert by_param[id(named["textual_head.transformer.linear.bias"])] == (0.001, 0.0)
    assert by_param[id(named["textual_head.transformer.linear.weight"])] == (0.001, 1e-4)


def _manual_lookahead(w0, grads, lr, alpha, k):
    """Plain SGD (no momentum) + Lookahead, written out step by step."""
    fast, slow = w0.clone(), w0.clone()
    for t, g in enumerate(grads, 1):
        fast = fast - lr * g
        if t % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
    return fast


def test_lookahead_matches_the_algorithm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    w0 = w.detach().clone()
    opt = LookaheadSGD([w], lr=0.1, momentum=0.0, lookahead_alpha=0.5, lookahead_steps=3)
    grads = [torch.randn(5) for _ in range(7)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert torch.allclose(w.detach(), _manual_lookahead(w0, grads, 0.1, 0.5, 3), atol=1e-6)


def test_lookahead_state_survives_state_dict_round_trip():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    opt = LookaheadSGD([w], lr=0.1, momentum=0.9, lookahead_alpha=0.5, lookahead_steps=5)
    grads = [torch.randn(3) for _ in range(9)]
    for g in grads[:4]:
        w.grad = g.clone()
        opt.step()
    saved_w, saved_state = w.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[4:]:
        w.grad = g.clone()
        opt.step()
    expected = w.detach().clone()

    w2 = nn.Parameter(saved_w.clone())
    opt2 = LookaheadSGD([w2], lr=0.1, momentum=0.9, lookahead_alpha=0.5, lookahead_steps=5)
    opt2.load_state_dict(saved_state)
    for g in grads[4:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w2.detach(), expected)


def test_gradient_norm_is_clipped_globally():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = LookaheadSGD([a, b], lr=1.0, momentum=0.0, clip_grad_norm=1.0)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    opt.step()
    assert opt.last_grad_norm == pytest.approx(5.0)
    assert torch.allclose(torch.cat([a, b]).detach(), -torch.tensor([0.6, 0.0, 0.0, 0.8]))
