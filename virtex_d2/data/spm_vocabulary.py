"""Turn the reference implementation's SentencePiece BPE vocabulary into our tokenizer's format.

The reference tokenizes captions with a SentencePiece BPE ``.model`` file after lower-casing them
and stripping accents (NFKD, combining marks removed). Here the same vocabulary becomes a
Hugging Face ``tokenizers`` json (what :class:`~.tokenizer.CaptionTokenizer` reads), with the
same ids, so an imported model's embedding rows keep their meaning:

- pieces keep their ids; the unknown piece (id 0, ``<unk>`` there) is renamed ``[UNK]``, the
  name our special-token check expects; ids 1-3 must be the control symbols [SOS], [EOS], [MASK];
- BPE merges are recovered from the pieces: SentencePiece merges the adjacent pair whose
  concatenation is the best-scored piece, so each piece of two or more characters contributes
  the splits into two existing pieces, ranked by that piece's score;
- normalisation: lower-case, NFKD, strip accents (the reference's caption transform), then NFKC
  and whitespace clean-up (SentencePiece's ``nmt_nfkc`` with ``add_dummy_prefix`` and
  ``remove_extra_whitespaces``); a "\u2581" word-start marker, as SentencePiece does.

Only the ``sentencepiece`` package's model reader is used, at import time; captioning and
training with the converted vocabulary need nothing but ``tokenizers``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..io import atomic_write_text
from .tokenizer import SPECIAL_TOKENS, WORD_START, CaptionTokenizer

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE_MODEL = 2
_NORMALIZERS = ("nmt_nfkc", "nfkc", "identity")


class VocabularyImportError(ValueError):
    """A SentencePiece model this converter cannot reproduce faithfully."""


def _load_model_proto(model_path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # pragma: no cover - it is in requirements.txt
        raise VocabularyImportError(
            "reading a SentencePiece vocabulary needs the `sentencepiece` package: "
            "pip install sentencepiece"
        ) from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except Exception as e:  # noqa: BLE001  (protobuf raises its own DecodeError)
        raise VocabularyImportError(f"{model_path} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise VocabularyImportError(f"{model_path} is not a SentencePiece model (no pieces)")
    return proto


def _check_specials(proto, model_path: str) -> None:
    want = [(_UNKNOWN, None), (_CONTROL, "[SOS]"), (_CONTROL, "[EOS]"), (_CONTROL, "[MASK]")]
    for i, (kind, name) in enumerate(want):
        piece = proto.pieces[i]
        if piece.type != kind or (name is not None and piece.piece != name):
            raise VocabularyImportError(
                f"{model_path}: id {i} is {piece.piece!r} (type {piece.type}); VirTex expects "
                "<unk>/padding 0, [SOS] 1, [EOS] 2, [MASK] 3 (the reference's vocabulary script "
                "writes them so)"
            )


def _merges(pieces: dict[str, tuple[int, float]]) -> list[tuple[str, str]]:
    """Merge rules: every split of a multi-character piece into two pieces, best score first."""
    ranked = []
    for piece, (pid, score) in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-score, pid, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def import_sentencepiece_vocabulary(
    model_path: str | os.PathLike, output: str | os.PathLike
) -> CaptionTokenizer:
    """Convert a SentencePiece BPE ``.model`` to our tokenizer json at ``output``.

    Raises:
        VocabularyImportError: not a BPE model, unexpected special ids, byte fallback, or a
            normaliser other than nmt_nfkc / nfkc / identity.
    """
    model_path = str(model_path)
    proto = _load_model_proto(model_path)
    if proto.trainer_spec.model_type != _BPE_MODEL:
        raise VocabularyImportError(
            f"{model_path}: model type {proto.trainer_spec.model_type} is not BPE (2); the "
            "reference trains BPE vocabularies, and only those are converted"
        )
    if proto.trainer_spec.byte_fallback:
        raise VocabularyImportError(f"{model_path}: byte-fallback vocabularies are not supported")
    norm = proto.normalizer_spec
    if norm.name not in _NORMALIZERS or proto.denormalizer_spec.name:
        raise VocabularyImportError(
            f"{model_path}: normaliser {norm.name!r} is not one of {_NORMALIZERS}"
        )
    _check_specials(proto, model_path)

    vocab: dict[str, int] = {}
    scored: dict[str, tuple[int, float]] = {}
    for pid, piece in enumerate(proto.pieces):
        name = SPECIAL_TOKENS[0] if pid == 0 else piece.piece
        vocab[name] = pid
        if piece.type in (_NORMAL, _USER_DEFINED):
            scored[piece.piece] = (pid, piece.score)
    bpe = models.BPE(
        vocab=vocab, merges=_merges(scored), unk_token=SPECIAL_TOKENS[0], fuse_unk=True
    )
    tok = Tokenizer(bpe)
    steps = [normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()]
    if norm.name != "identity":
        steps.append(normalizers.NFKC())
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=WORD_START,
        prepend_scheme="always" if norm.add_dummy_prefix else "never",
        split=bool(proto.trainer_spec.split_by_whitespace),
    )
    tok.decoder = decoders.Metaspace(replacement=WORD_START)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    output = Path(output)
    atomic_write_text(output, tok.to_str())
    return CaptionTokenizer(output)
