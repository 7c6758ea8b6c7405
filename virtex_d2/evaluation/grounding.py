"""Does a captioner look at the image? A check that caption metrics alone do not make.

A decoder can reach a low caption loss from the language prior alone (the words seen so far
predict the next ones) and then write the same caption for every image. This module scores the
teacher-forced caption loss twice on the same validation batches: with every image's own
caption, and with the images rotated by one place so that every caption is paired with another
image. If the model ignores the image, the two losses are equal; the difference (nats per
token) measures how much the image tells the decoder. It also counts distinct greedy captions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..config import CAPTIONING_TASKS
from ..modeling.meta_arch import pad_tokens


@dataclass
class GroundingReport:
    """Losses are forward-direction cross-entropies in nats per caption token, averaged over
    images; ``gap`` = shuffled - matched."""

    num_images: int
    loss: float
    shuffled_loss: float
    distinct_captions: int

    @property
    def gap(self) -> float:
        return self.shuffled_loss - self.loss

    def to_json(self) -> dict:
        return {**asdict(self), "gap": self.gap}


def rotation(n: int) -> torch.Tensor:
    """Index permutation (n,) that moves every item to another place (i -> i - 1 mod n)."""
    if n < 2:
        raise ValueError(
            f"a grounding batch needs at least 2 images to pair captions with others, got {n}"
        )
    return torch.roll(torch.arange(n), 1)


@torch.no_grad()
def measure_grounding(
    model: nn.Module, batches: Iterable[list[dict]], progress: bool = False
) -> GroundingReport:
    """``model``: a captioning-task ``VirTex``; ``batches``: lists of caption-mapper outputs
    (``image``, ``caption_tokens``; ``noitpac_tokens`` is not needed). Runs in eval mode."""
    if getattr(model, "task", None) not in CAPTIONING_TASKS:
        raise ValueError(
            f"grounding needs a {'/'.join(CAPTIONING_TASKS)} model, got task "
            f"{getattr(model, 'task', None)!r}"
        )
    model.eval()
    matched = shuffled = 0.0
    n = 0
    captions: set[tuple[int, ...]] = set()
    for batch in tqdm(batches, desc="grounding", disable=not progress):
        features = model.visual_features(batch)
        tokens = pad_tokens([x["caption_tokens"] for x in batch], features.device)
        visual = model.textual_head.project_visual(features)
        matched += model.caption_loss(visual, tokens, 0).item() * len(batch)
        shuffled += model.caption_loss(visual[rotation(len(batch))], tokens, 0).item() * len(batch)
        captions.update(tuple(t) for t in model.generate(features, decoder="greedy"))
        n += len(batch)
    if n == 0:
        raise ValueError("no images to measure grounding on")
    return GroundingReport(n, matched / n, shuffled / n, len(captions))


def grounding_batches(
    cfg, dataset: str, num_images: int = 48, batch_size: int = 16
) -> list[list[dict]]:
    """The first ``num_images`` images of a registered caption dataset, mapped for evaluation
    (config's resize + centre crop, first caption) and cut into batches of >= 2 images."""
    from detectron2.data import DatasetCatalog

    from ..data.caption_mapper import CaptionDatasetMapper

    if batch_size < 2:
        raise ValueError(
            f"batch size must be at least 2 (captions are paired with other "
            f"images), got {batch_size}"
        )
    if dataset not in DatasetCatalog.list():
        raise ValueError(f"dataset {dataset!r} is not registered")
    mapper = CaptionDatasetMapper(cfg, is_train=False)
    mapped = [mapper(r) for r in DatasetCatalog.get(dataset)[:num_images]]
    batches = [mapped[i : i + batch_size] for i in range(0, len(mapped), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        # A trailing single image has no other image to pair with: it joins the batch before.
        last = batches.pop()
        batches[-1] = batches[-1] + last
    return batches
