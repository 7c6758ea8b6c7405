"""The training steps tools/benchmarks/benchmark_pretrain.py and profile_pretrain.py time, and
their random inputs: (a) VirTex, (b) its CNN-only bound, (c') the reference-style step."""

from __future__ import annotations

import functools
from unittest import mock

import torch


def bench_cfg(config_file: str, opts: list[str], device: str):
    """The config the benchmarks build their models from."""
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    return cfg


def random_batch(cfg, batch_size: int, caption_length: int) -> list[dict]:
    """Mapped-sample dicts with random uint8 crops and random captions of one length."""
    g = torch.Generator().manual_seed(0)
    size = cfg.INPUT.VIRTEX.CROP_SIZE
    vocab = cfg.MODEL.VIRTEX.VOCAB_SIZE
    out = []
    for _ in range(batch_size):
        body = torch.randint(4, vocab, (caption_length - 2,), generator=g)
        toks = torch.cat([torch.tensor([1]), body, torch.tensor([2])])
        out.append(
            {
                "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
                "caption_tokens": toks,
                "noitpac_tokens": torch.cat([toks[:1], toks[1:-1].flip(0), toks[-1:]]),
                "masked_tokens": toks,
                "mlm_labels": toks * (torch.rand(len(toks), generator=g) < 0.15),
                "token_bag": body.unique(),
                "labels": torch.tensor([0, 5]),
            }
        )
    return out


class CNNOnly(torch.nn.Module):
    """Detectron2 ResNet + linear classifier on pooled features, fed like VirTex's backbone."""

    def __init__(self, model, num_classes=1000):
        super().__init__()
        self.backbone = model.backbone
        self.pixel_mean, self.pixel_std = model.pixel_mean, model.pixel_std
        self.channels_last = model.channels_last
        channels = self.backbone.output_shape()["res5"].channels
        self.fc = torch.nn.Linear(channels, num_classes)

    def forward(self, batch):
        from virtex_d2.modeling.meta_arch import normalized_images

        x = normalized_images(
            [b["image"] for b in batch], self.pixel_mean, self.pixel_std, self.channels_last
        )
        logits = self.fc(self.backbone(x)["res5"].mean(dim=(2, 3)))
        target = torch.zeros(len(batch), dtype=torch.long, device=x.device)
        return {"loss_cls": torch.nn.functional.cross_entropy(logits, target)}


STEPS = {
    "virtex": "(a) VirTex step (+clip, Lookahead)",
    "cnn": "(b) ResNet + linear (CNN bound)",
    "reference": "(c') reference-style step",
}


# The VirTex step with its fast paths switched on one after the other: (config overrides,
# batched bicaptioning). The last one is (a).
ABLATION = {
    "plain (NCHW, per-tensor loops, directions apart)": (
        ["MODEL.VIRTEX.CHANNELS_LAST", "False", "SOLVER.VIRTEX.FOREACH", "False"],
        False,
    ),
    "+ channels-last ResNet input": (["SOLVER.VIRTEX.FOREACH", "False"], False),
    "+ fused SGD, multi-tensor clip + Lookahead": ([], False),
    "+ bicaptioning's shared parts batched (= (a))": ([], True),
}


def build_step(which: str, cfg, device: str):
    """(model, step) for one of STEPS; ``step(batch)`` runs one training iteration."""
    from detectron2.modeling import build_model
    from reference_step import build_reference, reference_step

    from virtex_d2.solver import build_virtex_optimizer, multi_tensor_kwargs

    amp = device.startswith("cuda") and cfg.SOLVER.AMP.ENABLED
    scaler = torch.amp.GradScaler("cuda") if amp else None
    if which == "reference":
        model, opt = build_reference(cfg)
        clip = cfg.SOLVER.VIRTEX.CLIP_GRAD_NORM
        return model, functools.partial(
            reference_step, model, opt, clip=clip, amp=amp, scaler=scaler
        )
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    if which == "cnn":
        model = CNNOnly(model).to(device)
        opt = torch.optim.SGD(
            model.parameters(),
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            **multi_tensor_kwargs(model, cfg.SOLVER.VIRTEX.FOREACH),
        )
    else:
        opt = build_virtex_optimizer(cfg, model)

    return model, functools.partial(run_step, model, opt, mixed=amp, scaler=scaler)


def run_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: list[dict],
    *,
    mixed: bool = False,
    device_type: str = "cuda",
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One iteration as Detectron2's SimpleTrainer / AMPTrainer run_step does it, without
    loader and metrics: the forward under autocast when ``mixed``, the backward scaled when
    a GradScaler is given."""
    with torch.autocast(device_type, dtype=dtype, enabled=mixed):
        loss = sum(model(batch).values())
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
