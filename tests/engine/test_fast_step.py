"""The fast pretraining step (channels-last ResNet input, batched bicaptioning, fused SGD,
multi-tensor clipping and Lookahead) computes what the plain step computes, to float rounding."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import REPO, load_tool

import virtex_d2
from virtex_d2.modeling.meta_arch import normalized_images
from virtex_d2.solver import build_virtex_optimizer

CONFIG = str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml")
VOCAB = 40
SMALL_HEAD = [
    "MODEL.VIRTEX.TEXTUAL_HEAD.HIDDEN_SIZE",
    "32",
    "MODEL.VIRTEX.TEXTUAL_HEAD.NUM_HEADS",
    "2",
    "MODEL.VIRTEX.TEXTUAL_HEAD.FEEDFORWARD_SIZE",
    "64",
]


def tiny_cfg(*opts):
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.VIRTEX.VOCAB_SIZE",
            str(VOCAB),
            *SMALL_HEAD,
            # Dropout draws different masks when both directions share one embedding call, and
            # zero-initialised residual norms would leave most backbone gradients exactly zero.
            "MODEL.VIRTEX.TEXTUAL_HEAD.DROPOUT",
            "0.0",
            "MODEL.RESNETS.ZERO_INIT_RESIDUAL",
            "False",
            # Small enough that the step clips, and Lookahead syncs at the first step.
            "SOLVER.VIRTEX.CLIP_GRAD_NORM",
            "0.5",
            "SOLVER.VIRTEX.LOOKAHEAD.STEPS",
            "1",
            *opts,
        ]
    )
    return cfg


def build(cfg):
    torch.manual_seed(0)
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        return build_model(cfg)


def batch(lengths=(9, 6, 4), size=48):
    """Captions of different lengths, so padding and its masks are exercised."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        body = torch.randint(4, VOCAB, (n - 2,), generator=g)
        toks = torch.cat([torch.tensor([1]), body, torch.tensor([2])])
        out.append(
            {
                "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
                "caption_tokens": toks,
                "noitpac_tokens": torch.cat([toks[:1], toks[1:-1].flip(0), toks[-1:]]),
            }
        )
    return out


def fast_and_plain(dtype=torch.float32):
    fast = build(tiny_cfg())
    plain = build(tiny_cfg("MODEL.VIRTEX.CHANNELS_LAST", "False"))
    plain.load_state_dict(fast.state_dict())
    plain.batched_bicaptioning = False
    assert fast.channels_last and fast.batched_bicaptioning
    return fast.to(dtype).train(), plain.to(dtype).train()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (absolute when b is zero)."""
    diff = (a.double() - b.double()).norm().item()
    ref = b.double().norm().item()
    return diff / ref if ref > 0 else diff


def losses_and_grads(model, data):
    model.zero_grad(set_to_none=True)
    losses = model(data)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def worst_difference(model_a, model_b, data, prefix: str = "") -> float:
    """Largest relative difference of the two losses and of the gradients whose parameter
    name starts with ``prefix``."""
    losses_a, grads_a = losses_and_grads(model_a, data)
    losses_b, grads_b = losses_and_grads(model_b, data)
    assert losses_a.keys() == losses_b.keys() == {"loss_caption_forward", "loss_caption_backward"}
    assert grads_a.keys() == grads_b.keys()
    errors = [relative_error(losses_a[k], losses_b[k]) for k in losses_a]
    errors += [relative_error(grads_a[k], grads_b[k]) for k in grads_a if k.startswith(prefix)]
    return max(errors)


# Float64 makes rounding negligible, so the comparison tests the arithmetic itself: in
# float32 the channels-last convolutions round differently (~1e-6 of the features), and where
# a ReLU input lies that close to zero the unit flips, moving backbone gradients by ~1e-2 of
# their norm in some batches; both paths are then equally far from the float64 result.
@pytest.mark.parametrize("lengths,size", [((9, 6, 4), 48), ((7, 7), 64)])
def test_fast_losses_and_gradients_equal_plain(lengths, size):
    fast, plain = fast_and_plain(torch.float64)
    assert worst_difference(fast, plain, batch(lengths, size)) <= 1e-5


def test_fast_step_in_float32_equals_plain_to_rounding():
    fast, plain = fast_and_plain()
    # Losses and every textual-head gradient (no ReLU between them and the features).
    assert worst_difference(fast, plain, batch(), prefix="textual_head.") <= 1e-5
    # Bicaptioning batched vs per direction on the same layout: all gradients.
    plain.channels_last = True
    assert worst_difference(fast, plain, batch()) <= 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "textual_head.backward_transformer.layers.0.linear2.weight",
        "textual_head.transformer.layers.0.cross_attn.in_proj.weight",
        "backbone.res4.0.conv1.weight",
    ],
)
def test_comparison_catches_a_perturbed_weight(name):
    fast, plain = fast_and_plain(torch.float64)
    with torch.no_grad():
        dict(fast.named_parameters())[name].mul_(1.001)
    assert worst_difference(fast, plain, batch()) > 1e-5


def optimizer_step(model, grads, foreach: bool, **overrides):
    cfg = tiny_cfg("SOLVER.VIRTEX.FOREACH", str(foreach))
    for key, value in overrides.items():
        setattr(cfg.SOLVER.VIRTEX.LOOKAHEAD, key, value)
    opt = build_virtex_optimizer(cfg, model)
    assert bool(opt.defaults["fused"]) == foreach
    # The Lookahead sync must move the weights, so that it is compared too.
    with torch.no_grad():
        for p in model.parameters():
            p.grad = grads[p].clone()
    opt.step()
    assert opt.last_grad_norm > cfg.SOLVER.VIRTEX.CLIP_GRAD_NORM  # clipping ran
    return opt


def optimizer_difference(**overrides) -> float:
    fast, _ = fast_and_plain()
    plain = copy.deepcopy(fast)
    _, grads = losses_and_grads(fast, batch())
    named = dict(fast.named_parameters())
    grads_by_name = {n: grads.get(n, torch.zeros_like(p)) for n, p in named.items()}
    for model, foreach, extra in ((fast, True, overrides), (plain, False, {})):
        params = dict(model.named_parameters())
        optimizer_step(model, {params[n]: g for n, g in grads_by_name.items()}, foreach, **extra)
    fast_params, plain_params = dict(fast.named_parameters()), dict(plain.named_parameters())
    return max(relative_error(fast_params[n], plain_params[n]) for n in fast_params)


def test_fused_optimizer_lookahead_step_equals_plain():
    assert optimizer_difference() <= 1e-6


def test_optimizer_comparison_catches_a_changed_lookahead():
    assert optimizer_difference(ALPHA=0.6) > 1e-6


def test_self_attention_projection_in_one_product_equals_the_slices():
    from virtex_d2.modeling.transformer import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, 0.0)
    x = torch.randn(3, 5, 32)
    outs, grads = [], []
    for packed in (True, False):
        attn.zero_grad()
        qkv = (
            attn.project_query_key_value(x)
            if packed
            else (attn.project_query(x), *attn.project_key_value(x))
        )
        sum((t * torch.arange(t.numel()).view(t.shape).cos()).sum() for t in qkv).backward()
        outs.append(torch.cat([t.flatten() for t in qkv]))
        grads.append(torch.cat([attn.in_proj.weight.grad.flatten(), attn.in_proj.bias.grad]))
    assert relative_error(outs[0], outs[1]) <= 1e-6
    assert relative_error(grads[0], grads[1]) <= 1e-6


@pytest.mark.parametrize("max_norm", [1.0, 100.0])  # clipping and not
def test_multi_tensor_clipping_equals_clip_grad_norm(max_norm):
    from virtex_d2.solver import LookaheadSGD

    torch.manual_seed(0)
    grads = [torch.randn(4, 3) * 3, torch.randn(5) * 3]
    results = []
    for fused in (True, None):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = LookaheadSGD(params, lr=1.0, momentum=0.0, clip_grad_norm=max_norm, fused=fused)
        opt.step()
        results.append((opt.last_grad_norm, torch.cat([p.detach().flatten() for p in params])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert relative_error(results[0][1], results[1][1]) <= 1e-6


def test_loading_a_plain_optimizer_state_keeps_the_fused_kernel():
    from virtex_d2.solver import LookaheadSGD

    w = torch.nn.Parameter(torch.ones(3))
    plain = LookaheadSGD([w], lr=0.1, lookahead_steps=2)
    w.grad = torch.ones(3)
    plain.step()
    fused = LookaheadSGD([w], lr=0.1, lookahead_steps=2, fused=True)
    fused.load_state_dict(plain.state_dict())
    assert fused.param_groups[0]["fused"] and fused.param_groups[0]["lookahead_counter"] == 1
    assert torch.equal(fused.state[w]["momentum_buffer"], plain.state[w]["momentum_buffer"])


def test_unequal_images_are_padded_like_detectron2():
    mean, std = torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1), torch.tensor([2.0, 2.0, 4.0])
    std = std.view(-1, 1, 1)
    images = [
        torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8),
        torch.randint(0, 256, (3, 6, 4), dtype=torch.uint8),
    ]
    out = normalized_images(images, mean, std, channels_last=True)
    assert out.shape == (2, 3, 6, 7) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[0, :, :5, :7], (images[0] - mean) / std)
    assert torch.equal(out[1, :, :6, :4], (images[1] - mean) / std)
    assert out[0, :, 5:].abs().sum() == 0 and out[1, :, :, 4:].abs().sum() == 0


def test_profile_attributes_forward_and_backward_to_parts():
    profile = load_tool("profile_pretrain")
    result = profile.main(
        [
            "--config-file",
            CONFIG,
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--caption-length",
            "6",
            "MODEL.VIRTEX.TOKENIZER",
            "synthetic://",
            *SMALL_HEAD,
            "INPUT.VIRTEX.CROP_SIZE",
            "32",
        ]
    )
    for part in (
        "virtex.backbone",
        "virtex.forward_transformer",
        "virtex.backward_transformer",
        "virtex.output_layer",
    ):
        assert result["forward"][part] > 0 and result["backward"][part] > 0, part
    for part in ("virtex.clip_grad_norm", "virtex.sgd_step", "virtex.lookahead"):
        assert result["forward"][part] > 0, part
    assert 0 < result["backward_total"] < result["step"]
