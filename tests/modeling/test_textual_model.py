"""The VirTex meta-architecture: sizes, losses, decoding."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import virtex_cfg

from virtex_d2.data.tokenizer import EOS_ID, SOS_ID

# Counted on the reference implementation (../shared/virtex-reference.md), 10K vocabulary.
REFERENCE_COUNTS = [
    ("bicaptioning", 1, 1024, 69_482_320),
    ("bicaptioning", 1, 2048, 182_555_472),
    ("captioning", 1, 2048, 115_407_696),
    ("masked_lm", 1, 2048, 115_407_696),
    ("token_classification", 1, 1024, 43_998_032),
    ("multilabel_classification", 1, 1024, 23_674_001),
]


def _build(cfg, tokenizer=None):
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=tokenizer):
        return build_model(cfg)


@pytest.mark.parametrize("task,layers,hidden,expected", REFERENCE_COUNTS)
def test_parameter_counts_match_reference(task, layers, hidden, expected):
    cfg = virtex_cfg(task, depth=50, layers=layers, hidden=hidden, vocab_size=10000)
    cfg.MODEL.VIRTEX.TEXTUAL_HEAD.NUM_HEADS = hidden // 64
    cfg.MODEL.VIRTEX.NUM_MULTILABEL_CLASSES = 80
    model = _build(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032
    assert sum(p.numel() for p in model.parameters()) == expected


def test_output_layer_is_tied_and_residual_norms_start_at_zero():
    model = _build(virtex_cfg("captioning"))
    head = model.textual_head
    assert head.output.weight is head.embedding.words.weight
    zero = [
        m.conv2.norm.weight
        for m in model.backbone.modules()
        if hasattr(m, "conv2") and not hasattr(m, "conv3")
    ]
    assert zero and all(bool((w == 0).all()) for w in zero)


@pytest.mark.parametrize("std", [0.02, 0.0625])
def test_textual_head_init_std_is_configurable(std):
    torch.manual_seed(0)
    cfg = virtex_cfg("bicaptioning", hidden=256, vocab_size=1000)
    cfg.MODEL.VIRTEX.TEXTUAL_HEAD.INIT_STD = std
    head = _build(cfg).textual_head
    # Every weight matrix of the head (projection, attention, FFN, tied embedding/output)
    # draws from N(0, std); biases start at zero; LayerNorms keep PyTorch's (1, 0).
    for name, p in head.named_parameters():
        if "norm" in name:
            continue
        if name.endswith("bias"):
            assert bool((p == 0).all()), name
        elif p.dim() == 2:
            assert abs(p.std().item() - std) < 0.1 * std, (name, p.std().item())


def test_textual_head_init_std_must_be_positive():
    cfg = virtex_cfg("captioning")
    cfg.MODEL.VIRTEX.TEXTUAL_HEAD.INIT_STD = 0.0
    with pytest.raises(ValueError, match="INIT_STD"):
        _build(cfg)


def _batch(task, n=2, size=64, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(n):
        body = torch.randint(4, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        toks = torch.cat([torch.tensor([SOS_ID]), body, torch.tensor([EOS_ID])])
        d = {
            "image": torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8),
            "caption_tokens": toks,
            "noitpac_tokens": torch.cat([toks[:1], toks[1:-1].flip(0), toks[-1:]]),
            "token_bag": body.unique(),
            "labels": torch.tensor([0, 3]),
        }
        labels = torch.zeros_like(toks)
        labels[2] = toks[2]
        masked = toks.clone()
        masked[2] = 3
        d.update(masked_tokens=masked, mlm_labels=labels)
        batch.append(d)
    return batch


EXPECTED_LOSSES = {
    "bicaptioning": {"loss_caption_forward", "loss_caption_backward"},
    "captioning": {"loss_caption_forward"},
    "masked_lm": {"loss_masked_lm"},
    "token_classification": {"loss_token_classification"},
    "multilabel_classification": {"loss_multilabel_classification"},
}


@pytest.mark.parametrize("task", sorted(EXPECTED_LOSSES))
def test_training_step_every_task(task):
    model = _build(virtex_cfg(task))
    model.train()
    with EventStorage():
        losses = model(_batch(task))
    assert set(losses) == EXPECTED_LOSSES[task]
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_initial_caption_loss_is_near_uniform():
    torch.manual_seed(0)
    cfg = virtex_cfg("captioning", vocab_size=10000, hidden=128)
    model = _build(cfg)
    model.train()
    with EventStorage():
        loss = model(_batch("captioning", n=4, vocab=10000))["loss_caption_forward"]
    assert abs(loss.item() - math.log(10000)) < 0.5


@pytest.mark.parametrize(
    "decoder,beam", [("greedy", 1), ("beam", 1), ("beam", 3), ("beam", 5), ("nucleus", 1)]
)
def test_cached_decoding_equals_uncached(decoder, beam):
    torch.manual_seed(1)
    cfg = virtex_cfg("captioning", layers=2, hidden=64, vocab_size=50)
    cfg.MODEL.VIRTEX.DECODER.BEAM_SIZE = beam
    cfg.MODEL.VIRTEX.DECODER.MAX_LENGTH = 12
    model = _build(cfg).eval()
    # Spread the output distribution so decoding is not a near-tie everywhere.
    with torch.no_grad():
        model.textual_head.embedding.words.weight.mul_(20)
    features = torch.randn(3, 512, 2, 2)
    cached = model.generate(features, decoder=decoder, use_cache=True)
    uncached = model.generate(features, decoder=decoder, use_cache=False)
    assert cached == uncached
    assert any(len(t) > 1 for t in cached)


def test_beam_search_finds_a_better_sequence_than_greedy_on_average():
    torch.manual_seed(2)
    cfg = virtex_cfg("captioning", hidden=64, vocab_size=50)
    cfg.MODEL.VIRTEX.DECODER.MAX_LENGTH = 8
    model = _build(cfg).eval()
    with torch.no_grad():
        model.textual_head.embedding.words.weight.mul_(20)
    features = torch.randn(4, 512, 2, 2)

    def logprob(tokens_list):
        total = 0.0
        visual = model.textual_head.project_visual(features)
        for i, toks in enumerate(tokens_list):
            seq = torch.tensor([[SOS_ID, *toks, EOS_ID]])[
                :, : cfg.MODEL.VIRTEX.DECODER.MAX_LENGTH + 1
            ]
            mem = model.textual_head.memory(visual[i : i + 1])
            hidden, _ = model.textual_head(seq[:, :-1], mem)
            lp = model.textual_head.logits(hidden).log_softmax(-1)
            total += lp[0].gather(1, seq[0, 1:, None]).sum().item()
        return total

    greedy = model.generate(features, decoder="greedy")
    model.beam_size = 5
    beam = model.generate(features, decoder="beam")
    assert logprob(beam) >= logprob(greedy) - 1e-4
