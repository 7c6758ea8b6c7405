"""The reference implementation's caption decoders, reproduced step for step.

Captions written by the authors' released models were decoded this way, so a model imported with
``tools/import_reference.py`` must decode the same way to give the same captions (and the same
CIDEr). Our own decoders (:mod:`.decoding`) stay the default for models trained here; these
differ from them in ways that change tokens:

Beam search (``reference_beam``):

- The first step sees ``[SOS]`` alone and keeps the ``beam_size`` best tokens.
- Each later step expands every beam by only its ``per_node_beam_size`` (2) best tokens, then
  keeps the ``beam_size`` best of those ``beam_size * per_node_beam_size`` candidates.
- **The prefix fed back omits [SOS]**: after the first step the decoder sees ``t_1 .. t_k`` at
  positions ``0 .. k-1``, not ``[SOS] t_1 .. t_k``.
- The token just generated is banned at the next step (its log-probability set to -10000).
- A beam that emitted [EOS] can only emit [EOS] again, at no cost; beam scores are plain sums of
  log-probabilities (no length penalty); decoding stops when every beam's last token is [EOS]
  or after ``max_steps`` tokens, and the first beam (the best by summed log-probability) wins.

Nucleus sampling (``reference_nucleus``): the prefix fed back does start with [SOS]; the tokens
after the cumulative probability first exceeds ``top_p`` are removed (the one crossing it is
kept) and so is the token just generated; a finished caption only appends [EOS].

Both call a step function with the whole prefix the reference would feed, so the caller may
recompute it or reuse cached keys/values (both are tested equal).
"""

from __future__ import annotations

from typing import Callable

import torch

# Log-probability the reference gives the previous token, to avoid immediate repetition.
REPEAT_PENALTY_LOGPROB = -10000.0

StepFn = Callable[[torch.Tensor], torch.Tensor]
ReorderFn = Callable[[torch.Tensor], None]


def ban_last_token(logp: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """logp: (N, V) log-probabilities; prefix: (N, t). Sets each row's ``prefix[:, -1]`` entry
    to -10000 in place and returns ``logp``."""
    logp.scatter_(1, prefix[:, -1:], REPEAT_PENALTY_LOGPROB)
    return logp


def _strip_after_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@torch.no_grad()
def reference_beam_search(
    first_step: Callable[[], torch.Tensor],
    step: StepFn,
    reorder: ReorderFn | None,
    batch_size: int,
    beam_size: int,
    eos: int,
    max_steps: int,
    per_node_beam_size: int = 2,
) -> tuple[list[list[int]], torch.Tensor]:
    """Beam search as the reference implementation runs it (see the module docstring).

    Args:
        first_step: returns log-probabilities (B, V) of the first token given ``[SOS]``, with
            [SOS] itself banned.
        step: maps the fed-back prefix (B*K, t) (generated tokens only, no [SOS]; the beams of
            image b are rows b*K .. b*K+K-1) to log-probabilities (B*K, V) with the last prefix
            token banned.
        reorder: called with the source rows (B*K,) after each step, so cached keys/values can
            follow their beams; None for a step function that recomputes everything.

    Returns:
        Token lists of the best beam per image, cut at the first [EOS] (excluded), and that
        beam's summed log-probability (B,).
    """
    k, per_node = beam_size, per_node_beam_size or beam_size
    logp = first_step().float()
    device = logp.device
    vocab = logp.shape[-1]
    scores, first = logp.topk(k, dim=1)  # (B, K)
    tokens = first.reshape(batch_size * k, 1)
    only_eos = torch.full((batch_size * k, vocab), float("-inf"), device=device)
    only_eos[:, eos] = 0.0
    base = torch.arange(batch_size, device=device)[:, None] * k
    for _ in range(max_steps - 1):
        last = tokens[:, -1]
        if bool((last == eos).all()):
            break
        logp = step(tokens).float()
        logp = torch.where((last == eos)[:, None], only_eos, logp)
        # shape: (B*K, per_node) best continuations of every beam
        top_logp, top_tok = logp.topk(per_node, dim=1)
        candidates = (top_logp + scores.reshape(-1, 1)).reshape(batch_size, k * per_node)
        scores, chosen = candidates.topk(k, dim=1)  # (B, K), indices into K * per_node
        rows = (base + torch.div(chosen, per_node, rounding_mode="floor")).reshape(-1)
        new_tok = top_tok.reshape(batch_size, k * per_node).gather(1, chosen).reshape(-1, 1)
        tokens = torch.cat([tokens[rows], new_tok], dim=1)
        if reorder is not None:
            reorder(rows)
    best = tokens.reshape(batch_size, k, -1)[:, 0]
    return _strip_after_eos(best.tolist(), eos), scores[:, 0]


@torch.no_grad()
def reference_nucleus_sample(
    step: StepFn,
    batch_size: int,
    sos: int,
    eos: int,
    max_steps: int,
    device: torch.device,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Nucleus sampling as the reference runs it (see the module docstring).

    ``step`` maps the prefix (B, t), which starts with [SOS], to log-probabilities (B, V) with
    the last prefix token banned. Returns B token lists cut at the first [EOS] (excluded).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    tokens = torch.full((batch_size, 1), sos, dtype=torch.long, device=device)
    for _ in range(max_steps):
        last = tokens[:, -1]
        if bool((last == eos).all()):
            break
        logits = step(tokens).float()
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        # Shift right: the token that crosses top_p stays in the nucleus, and so does the first.
        remove_sorted[:, 1:] = remove_sorted[:, :-1].clone()
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, -1e12)
        logits.scatter_(1, last[:, None], -1e12)
        choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        choice = torch.where(last == eos, torch.full_like(choice, eos), choice)
        tokens = torch.cat([tokens, choice[:, None]], dim=1)
    return _strip_after_eos(tokens[:, 1:].tolist(), eos)
