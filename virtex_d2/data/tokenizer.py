"""Sub-word caption tokenizer (HF `tokenizers` byte-pair encoding, SentencePiece-style spaces).

BPE rather than a Unigram model: on small caption sets (the synthetic data has ~70 words)
Unigram training keeps splitting whole words into characters, BPE learns the words.

Special ids follow the paper: [UNK] and padding share id 0, [SOS] 1, [EOS] 2, [MASK] 3.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..io import atomic_write_text

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[UNK]", "[SOS]", "[EOS]", "[MASK]")
PAD_ID, UNK_ID, SOS_ID, EOS_ID, MASK_ID = 0, 0, 1, 2, 3
# How SentencePiece (and so the reference implementation) writes an unknown piece in text.
UNK_SURFACE = " \u2047 "
# Marks a word start inside sub-word pieces (SentencePiece / HF Metaspace).
WORD_START = "\u2581"


def _read_captions(captions_json: str | os.PathLike) -> Iterator[str]:
    with open(captions_json) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(
            f"{captions_json} is not a COCO captions file: expected a json object with an "
            "'annotations' list of {'image_id', 'caption'} records"
        )
    for ann in data["annotations"]:
        caption = ann.get("caption")
        if isinstance(caption, str) and caption.strip():
            yield caption


def train_vocabulary(
    captions_jsons: Iterable[str | os.PathLike], vocab_size: int, output: str | os.PathLike
) -> CaptionTokenizer:
    """Learn a lower-cased sub-word vocabulary of ``vocab_size`` units from COCO caption files.

    The file is written atomically (temporary file, then rename) so concurrent readers never
    see a partial vocabulary.
    """
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()]
    )
    # Punctuation becomes its own token ("square." -> "▁square", "."); the Metaspace markers
    # make decoding restore the original spacing exactly.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    captions_jsons = [str(p) for p in captions_jsons]
    captions = [c for path in captions_jsons for c in _read_captions(path)]
    if not captions:
        raise ValueError(f"no non-empty captions found in {captions_jsons}")
    tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
    if tok.get_vocab_size() < vocab_size:
        logger.warning(
            "the captions of %s allow only %d sub-words, fewer than the %d asked for",
            captions_jsons,
            tok.get_vocab_size(),
            vocab_size,
        )
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    output = Path(output)
    atomic_write_text(output, tok.to_str())
    logger.info(
        "Wrote a %d-token vocabulary learned from %d captions to %s",
        tok.get_vocab_size(),
        len(captions),
        output,
    )
    return CaptionTokenizer(output)


class CaptionTokenizer:
    """Wraps a saved `tokenizers` json; picklable so data-loader workers can carry it."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"tokenizer file {self.path} does not exist: build one with "
                "`python tools/build_vocabulary.py --captions CAPTIONS.json --vocab-size N "
                "--output FILE` and point MODEL.VIRTEX.TOKENIZER at it"
            )
        self._tok = Tokenizer.from_file(self.path)
        for i, name in enumerate(SPECIAL_TOKENS):
            if self._tok.token_to_id(name) != i:
                raise ValueError(
                    f"{self.path}: special token {name} must have id {i}, has "
                    f"{self._tok.token_to_id(name)}; rebuild it with tools/build_vocabulary.py"
                )

    def __getstate__(self) -> dict:
        return {"path": self.path, "json": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._tok = Tokenizer.from_str(state["json"])

    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    def get_vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as SentencePiece writes it: decoding stops at the first [EOS] (what
        follows is padding), [SOS]/[MASK] are dropped, an unknown piece (id 0 before [EOS], which
        a decoder can generate) becomes " \u2047 ", each "\u2581" becomes a space, and the
        word-start space is dropped while nothing has been written yet.
        """
        text = ""
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i == UNK_ID:
                text += UNK_SURFACE
            elif i >= len(SPECIAL_TOKENS):
                piece = self._tok.id_to_token(i)
                if not text and piece.startswith(WORD_START):
                    piece = piece[1:]
                text += piece.replace(WORD_START, " ")
        return text

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def word_spans(tokenizer: CaptionTokenizer, tokens: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Group a caption's token ids into words: [(word, positions in ``tokens``), ...].

    A piece starting with "▁" (Metaspace) begins a word; other pieces continue it. Special ids
    are dropped (decoding drops them too), and a bare "▁" piece joins the following word, so
    the words equal ``tokenizer.decode(tokens).split()``.
    """
    groups: list[list[int]] = []
    for pos, tok in enumerate(tokens):
        if int(tok) < len(SPECIAL_TOKENS):
            continue
        if not groups or tokenizer.id_to_token(tok).startswith(WORD_START):
            groups.append([pos])
        else:
            groups[-1].append(pos)
    spans: list[tuple[str, list[int]]] = []
    carry: list[int] = []
    for group in groups:
        positions = carry + group
        word = tokenizer.decode([tokens[p] for p in positions]).strip()
        if word:
            spans.append((word, positions))
            carry = []
        else:  # a bare "▁": its text (and attention) belong to the next word
            carry = positions
    return spans
