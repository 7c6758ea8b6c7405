"""Caption decoding: greedy, beam search and nucleus sampling over a step function.

The decoders know nothing about transformers. They call ``step(tokens)`` with every token
generated so far, ``tokens``: (N, t) int64 starting with [SOS], and get log-probabilities of
the next token, (N, V). Beam search also calls ``reorder(indices)`` after each step so a cached
step function can permute its key/value caches along with the beams. Whether the step function
reuses cached keys/values or recomputes the whole prefix is invisible here, which is what lets
tests compare the two exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[[torch.Tensor], torch.Tensor]
ReorderFn = Callable[[torch.Tensor], None]


def _strip(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Drop [SOS]; cut at the first [EOS] (excluded)."""
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _decode_one_path(
    step: StepFn,
    choose: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    sos: int,
    eos: int,
    max_length: int,
    device: torch.device,
) -> list[list[int]]:
    """One caption per image: ``choose`` maps log-probabilities (B, V) to next tokens (B,);
    finished captions keep appending [EOS]."""
    tokens = torch.full((batch_size, 1), sos, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_length):
        next_tok = choose(step(tokens))
        next_tok = torch.where(finished, torch.full_like(next_tok, eos), next_tok)
        tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
        finished |= next_tok == eos
        if bool(finished.all()):
            break
    return _strip(tokens, eos)


@torch.no_grad()
def greedy_decode(
    step: StepFn, batch_size: int, sos: int, eos: int, max_length: int, device: torch.device
) -> list[list[int]]:
    """Most likely token at every step. Returns B token lists (no [SOS]/[EOS])."""
    return _decode_one_path(
        step, lambda logp: logp.argmax(dim=-1), batch_size, sos, eos, max_length, device
    )


@torch.no_grad()
def beam_search(
    step: StepFn,
    reorder: ReorderFn | None,
    batch_size: int,
    beam_size: int,
    sos: int,
    eos: int,
    max_length: int,
    device: torch.device,
    length_penalty: float = 0.0,
) -> tuple[list[list[int]], torch.Tensor]:
    """Beam search; ``step`` sees N = batch_size * beam_size rows, beams of image b at rows
    b*K ... b*K+K-1. Finished beams keep their score and only extend with [EOS].

    Returns the best token list per image and its score (B,), the summed log-probability
    divided by ``length ** length_penalty`` (length counts the [EOS]).
    """
    k = beam_size
    n = batch_size * k
    tokens = torch.full((n, 1), sos, dtype=torch.long, device=device)
    # Only the first beam is live at the start, so the K beams do not all pick the same token.
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    for _ in range(max_length):
        logp = step(tokens).float()
        vocab = logp.shape[-1]
        # A finished beam has exactly one continuation, [EOS], at no cost.
        logp = torch.where(finished[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[finished, eos] = 0.0
        candidates = (scores.view(n, 1) + logp).view(batch_size, k * vocab)
        scores, flat_idx = candidates.topk(k, dim=1)
        beam_idx = torch.div(flat_idx, vocab, rounding_mode="floor")
        next_tok = (flat_idx % vocab).view(n)
        rows = (torch.arange(batch_size, device=device)[:, None] * k + beam_idx).view(n)
        was_finished = finished[rows]
        tokens = torch.cat([tokens[rows], next_tok[:, None]], dim=1)
        lengths = lengths[rows] + (~was_finished).long()
        finished = was_finished | (next_tok == eos)
        if reorder is not None:
            reorder(rows)
        if bool(finished.all()):
            break
    final = scores.view(n)
    if length_penalty:
        final = final / lengths.clamp(min=1).float() ** length_penalty
    best = final.view(batch_size, k).argmax(dim=1)
    rows = torch.arange(batch_size, device=device) * k + best
    return _strip(tokens[rows], eos), final[rows]


@torch.no_grad()
def nucleus_sample(
    step: StepFn,
    batch_size: int,
    sos: int,
    eos: int,
    max_length: int,
    device: torch.device,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample from the smallest set of tokens whose probability mass reaches ``top_p``."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def choose(logp: torch.Tensor) -> torch.Tensor:
        sorted_p, order = logp.float().exp().sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the first token is always kept).
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(
            sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator
        )
        return order.gather(1, choice).squeeze(1)

    return _decode_one_path(step, choose, batch_size, sos, eos, max_length, device)
