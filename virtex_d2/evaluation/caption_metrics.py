"""
Caption metrics computed with the official COCO caption toolkit (``pycocoevalcap``).

We call the toolkit's own PTBTokenizer and scorers rather than re-implementing them, so that
the numbers are bit-for-bit those of ``pycocoevalcap.eval.COCOEvalCap`` on the same images (in
the same order). All scores are reported in **percent** (the toolkit's 0-1 value times 100), as
papers do: the VirTex paper's CIDEr 94.0 is the toolkit's 0.940.

Metrics (names used as keys everywhere in this package):
``BLEU-1`` ... ``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr`` (the toolkit's ``Cider`` scorer,
which is CIDEr-D: clipped n-gram counts and a Gaussian length penalty), ``SPICE``.

Java: the PTB tokenizer is a Java program, so without Java no official number exists and
:func:`score_captions` raises :class:`JavaNotFoundError`. METEOR and SPICE are also Java; they
are optional: when they cannot run (no Java, jar or models missing; SPICE's Stanford CoreNLP
models are fetched by the toolkit from the internet at first use, which we never trigger), they
are skipped with one logged warning and listed in :attr:`CaptionScores.skipped`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pycocoevalcap.meteor.meteor as _meteor_mod
import pycocoevalcap.spice.get_stanford_models as _spice_models_mod
import pycocoevalcap.spice.spice as _spice_mod
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_mod
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

__all__ = [
    "METRIC_NAMES",
    "OPTIONAL_METRICS",
    "CaptionScores",
    "JavaNotFoundError",
    "find_java",
    "optional_metric_problems",
    "tokenize_captions",
    "score_captions",
]

logger = logging.getLogger(__name__)

METRIC_NAMES = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr",
    "SPICE",
)
OPTIONAL_METRICS = ("METEOR", "SPICE")
_BLEU_NAMES = METRIC_NAMES[:4]

# Where the toolkit keeps its jars; read from its own modules so a toolkit update is followed.
_TOKENIZER_DIR = Path(_ptb_mod.__file__).resolve().parent
_TOKENIZER_JAR = _TOKENIZER_DIR / _ptb_mod.STANFORD_CORENLP_3_4_1_JAR
_METEOR_DIR = Path(_meteor_mod.__file__).resolve().parent
_METEOR_JAR = _METEOR_DIR / _meteor_mod.METEOR_JAR
_METEOR_PARAPHRASES = _METEOR_DIR / "data" / "paraphrase-en.gz"
_SPICE_DIR = Path(_spice_mod.__file__).resolve().parent
_SPICE_JAR = _SPICE_DIR / _spice_mod.SPICE_JAR
# SPICE's constructor downloads these two CoreNLP jars when the first is absent; we check both.
_SPICE_CORENLP_JARS = tuple(
    _SPICE_DIR / _spice_models_mod.SPICELIB / pattern.format(_spice_models_mod.JAR)
    for pattern in ("{}.jar", "{}-models.jar")
)


class JavaNotFoundError(RuntimeError):
    """Raised when the official PTB tokenizer cannot run because Java is missing."""


@dataclass(frozen=True)
class CaptionScores:
    """
    Result of :func:`score_captions`.

    Attributes:
        scores: metric name -> score in percent (0-100; CIDEr may exceed 100). Only metrics
            that were computed appear here, never NaN placeholders.
        skipped: metric name -> one-line reason, for requested optional metrics that could not
            run (METEOR, SPICE).
        num_images: how many images were scored.
    """

    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    num_images: int = 0

    def to_json(self) -> dict:
        """A JSON-serialisable dict: ``{"scores": {...}, "skipped": {...}, "num_images": N}``."""
        return {
            "scores": dict(self.scores),
            "skipped": dict(self.skipped),
            "num_images": self.num_images,
        }


def find_java() -> str | None:
    """Path of the ``java`` executable the toolkit will run (looked up on PATH), or None."""
    return shutil.which("java")


def optional_metric_problems(metrics: Iterable[str] = OPTIONAL_METRICS) -> dict[str, str]:
    """
    Check up front, without starting or downloading anything, whether METEOR / SPICE can run.

    Args:
        metrics: names among :data:`OPTIONAL_METRICS` to check; others are ignored.

    Returns:
        metric name -> reason it cannot run, for those that cannot; empty if all can.
    """
    problems: dict[str, str] = {}
    java = find_java()
    for name in metrics:
        if name not in OPTIONAL_METRICS:
            continue
        if java is None:
            problems[name] = "java not found on PATH"
        elif name == "METEOR":
            missing = [p for p in (_METEOR_JAR, _METEOR_PARAPHRASES) if not p.is_file()]
            if missing:
                problems[name] = "missing " + ", ".join(str(p) for p in missing)
        elif name == "SPICE":
            missing = [p for p in (_SPICE_JAR,) + _SPICE_CORENLP_JARS if not p.is_file()]
            if missing:
                # The toolkit would try to download these from nlp.stanford.edu (fails offline
                # and may hang), so we report rather than trigger it.
                problems[name] = (
                    "Stanford CoreNLP for SPICE not installed (missing "
                    + ", ".join(p.name for p in missing)
                    + "; pycocoevalcap downloads it on first use, which needs internet)"
                )
            elif not os.access(_SPICE_DIR, os.W_OK):
                problems[name] = f"{_SPICE_DIR} is not writable (SPICE keeps tmp/ and cache/ there)"
    return problems


def _check_tokenizer() -> None:
    """Raise a clear error when the official PTB tokenizer cannot run."""
    if find_java() is None:
        raise JavaNotFoundError(
            "Caption metrics need Java: the official COCO PTB tokenizer "
            f"({_TOKENIZER_JAR.name}) is a Java program and no `java` was found on PATH. "
            "Install a JRE (e.g. `apt-get install default-jre-headless`)."
        )
    if not _TOKENIZER_JAR.is_file():
        raise FileNotFoundError(f"PTB tokenizer jar not found: {_TOKENIZER_JAR}")
    if not os.access(_TOKENIZER_DIR, os.W_OK):
        # pycocoevalcap writes its temporary input file next to the jar.
        raise PermissionError(
            f"pycocoevalcap's tokenizer writes a temporary file into {_TOKENIZER_DIR}, "
            "which is not writable"
        )


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """
    Tokenize with the toolkit's PTBTokenizer (lower-case, punctuation removed).

    Args:
        captions: key -> list of raw caption strings. Keys are only used on the Python side.

    Returns:
        key -> list of tokenized captions (space-separated tokens), same keys and lengths.

    Raises:
        JavaNotFoundError: Java is missing.
        RuntimeError: the tokenizer returned fewer lines than it was given (it failed).
    """
    _check_tokenizer()
    wrapped = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    tokenized = _ptb_mod.PTBTokenizer().tokenize(wrapped)
    # The toolkit pairs output lines with inputs by zip(), so a failing JVM silently yields a
    # short result; compare counts so such a failure cannot pass for a score.
    lost = [k for k, caps in captions.items() if len(tokenized.get(k, [])) != len(caps)]
    if lost:
        raise RuntimeError(
            f"PTB tokenizer returned incomplete output for {len(lost)} of {len(captions)} "
            "entries (see the java error above)"
        )
    return tokenized


def _few(ids: Sequence[Hashable], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _align(
    gts: Mapping[Hashable, Sequence[str]],
    results: Mapping[Hashable, str],
    allow_subset: bool,
) -> list[Hashable]:
    """Validate inputs; return the image ids to score, in ``gts`` order."""
    if not results:
        raise ValueError("No caption results to score")
    unknown = [i for i in results if i not in gts]
    if unknown:
        raise ValueError(f"Results for images missing from the ground truth: {_few(unknown)}")
    ids = [i for i in gts if i in results]
    if len(ids) < len(gts):
        missing = [i for i in gts if i not in results]
        if not allow_subset:
            raise ValueError(
                f"Ground-truth images without a result: {_few(missing)}. "
                "Pass allow_subset=True to score only the images that have results."
            )
        # CIDEr's document frequencies come from the scored references, so subset numbers are
        # not comparable with full-split numbers.
        logger.info("Scoring %d of %d ground-truth images (subset).", len(ids), len(gts))
    for i in ids:
        refs = gts[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"Image {i!r}: ground truth must be a non-empty list of str")
        if not isinstance(results[i], str):
            raise ValueError(f"Image {i!r}: result must be a str, got {type(results[i]).__name__}")
    return ids


def _run_optional(scorer_cls, gts, res) -> float:
    scorer = scorer_cls()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        del scorer  # METEOR's wrapper stops its JVM in __del__
    return float(score)


def score_captions(
    gts: Mapping[Hashable, Sequence[str]],
    results: Mapping[Hashable, str],
    metrics: Iterable[str] | None = None,
    allow_subset: bool = False,
) -> CaptionScores:
    """
    Score one caption per image against reference captions, like the official toolkit.

    Args:
        gts: image id -> list of reference captions (raw text). Its iteration order is the
            order images are scored in (``COCO.getImgIds()`` order reproduces COCOEvalCap).
        results: image id -> predicted caption (raw text). Ids may be ints, strings (spaces
            allowed) or any hashable; they are mapped to internal integer keys.
        metrics: names from :data:`METRIC_NAMES`; None means all of them.
        allow_subset: if False (default), every image of ``gts`` needs a result. If True,
            only images with a result are scored (note: CIDEr then uses the subset's
            references for its document frequencies).

    Returns:
        :class:`CaptionScores` with scores in percent and the skipped optional metrics.

    Raises:
        JavaNotFoundError: Java is missing (the tokenizer needs it).
        ValueError: unknown metric names, results for images not in ``gts``, images of
            ``gts`` without results (unless ``allow_subset``), malformed captions.
    """
    wanted = list(METRIC_NAMES) if metrics is None else list(dict.fromkeys(metrics))
    bad = [m for m in wanted if m not in METRIC_NAMES]
    if bad or not wanted:
        raise ValueError(f"Unknown or no metrics {bad}; choose from {list(METRIC_NAMES)}")
    ids = _align(gts, results, allow_subset)
    _check_tokenizer()
    skipped = optional_metric_problems(wanted)
    for name, reason in skipped.items():
        logger.warning("Skipping %s: %s", name, reason)

    # Consecutive ints keep gts order (scorers iterate dicts in insertion order, and SPICE
    # sorts keys) and are safe in every file the Java tools read.
    refs = tokenize_captions({k: list(gts[i]) for k, i in enumerate(ids)})
    hyps = tokenize_captions({k: [results[i]] for k, i in enumerate(ids)})

    scores: dict[str, float] = {}
    # Bleu prints its statistics unless verbose=0; the redirect keeps any other Python-side
    # print of the toolkit off the caller's stdout too.
    with contextlib.redirect_stdout(io.StringIO()):
        if any(m in wanted for m in _BLEU_NAMES):
            bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
            for name, value in zip(_BLEU_NAMES, bleu):
                scores[name] = float(value) * 100.0
        for name, scorer_cls in (("METEOR", _meteor_mod.Meteor), ("SPICE", _spice_mod.Spice)):
            if name not in wanted or name in skipped:
                continue
            try:
                scores[name] = _run_optional(scorer_cls, refs, hyps) * 100.0
            except Exception as exc:  # an optional metric must not abort evaluation
                skipped[name] = f"failed while running: {exc!r}"
                logger.warning("Skipping %s: %s", name, skipped[name])
        if "ROUGE-L" in wanted:
            scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0]) * 100.0
        if "CIDEr" in wanted:
            scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0]) * 100.0

    ordered = {m: scores[m] for m in METRIC_NAMES if m in wanted and m in scores}
    return CaptionScores(scores=ordered, skipped=skipped, num_images=len(ids))
