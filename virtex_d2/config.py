"""Every config key virtex-d2 adds to Detectron2's config, and the one way to build a config.

- :func:`add_virtex_config`: all keys, each with a comment: pretraining (``MODEL.VIRTEX``,
  ``INPUT.VIRTEX``, ``SOLVER.VIRTEX``), classification transfer (``MODEL.CLASSIFIER``,
  ``INPUT.CLASSIFICATION``, ``TEST.CLASSIFICATION``, ``TEST.VOC07_SVM``) and the failure
  policies (bad data, weight loading). Defaults describe the paper's base pretraining run
  (bicaptioning, R-50, L1_H1024_A16_F4096, COCO Captions, 10K vocabulary) and the reference
  code's downstream protocols; architectures are explicit integers, never encoded in names.
- :func:`setup_cfg`: defaults, a config file and ``KEY VALUE`` overrides merged with errors that
  name the file, the key and the fix (:class:`ConfigError`), then checks that need the whole
  config. ``tools/train_net.py`` and every tool build their config with it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

PRETRAINING_TASKS = (
    "bicaptioning",
    "captioning",
    "token_classification",
    "multilabel_classification",
    "masked_lm",
)
# The tasks whose textual head generates captions (left to right).
CAPTIONING_TASKS = ("bicaptioning", "captioning")
# Caption decoders (MODEL.VIRTEX.DECODER.NAME). "reference_*" reproduce the reference
# implementation's decoders exactly (see modeling/reference_decoding.py); imported reference
# checkpoints use "reference_beam".
DECODERS = ("beam", "greedy", "nucleus", "reference_beam", "reference_nucleus")


WEIGHTS_REQUIRED_CHOICES = ("auto", "all", "resnet", "none")


class ConfigError(ValueError):
    """A config file or command-line override that cannot be applied."""


def add_virtex_config(cfg: CN) -> None:
    """Add every virtex-d2 key to a Detectron2 config, in place (idempotent)."""
    _add_classification_keys(cfg)
    _add_failure_policy_keys(cfg)
    if "VIRTEX" in cfg.MODEL:
        return
    _C = cfg

    _C.MODEL.VIRTEX = CN()
    # One of PRETRAINING_TASKS. Bicaptioning is the paper's default and strongest task.
    _C.MODEL.VIRTEX.TASK = "bicaptioning"
    # Tokenizer json written by tools/build_vocabulary.py (HF `tokenizers` format). The special
    # "synthetic://" prefix means the vocabulary of the embedded synthetic dataset, built on first
    # use under $DETECTRON2_DATASETS/synthetic.
    _C.MODEL.VIRTEX.TOKENIZER = "datasets/vocab/coco_10k.json"
    # Must equal the tokenizer's size (checked when the model is built).
    _C.MODEL.VIRTEX.VOCAB_SIZE = 10000
    # Captions are clipped to this many tokens, [SOS] and [EOS] included.
    _C.MODEL.VIRTEX.MAX_CAPTION_LENGTH = 30
    # Number of classes for multilabel_classification (COCO: 80 object categories).
    _C.MODEL.VIRTEX.NUM_MULTILABEL_CLASSES = 80
    # Feed the ResNet channels-last (NHWC) images, so that every activation stays NHWC (the
    # conv weights keep their NCHW layout: NHWC weights gain nothing more here and would make
    # the fused SGD kernel copy them every step). oneDNN's CPU convolutions and batch norms run
    # faster on it: R-50 forward + backward, batch 8, one thread, 2.52 s vs 2.73 s NCHW (median
    # of 6). The numbers are the same to float rounding. False where NCHW is faster (not
    # measured on a GPU, where cuDNN then converts the weights at every call).
    _C.MODEL.VIRTEX.CHANNELS_LAST = True

    # Textual head: a transformer over caption tokens, cross-attending to the visual grid.
    _C.MODEL.VIRTEX.TEXTUAL_HEAD = CN()
    # A name in TEXTUAL_HEAD_REGISTRY. The tasks pick the attention mask themselves
    # (causal for captioning, bidirectional for masked LM); classification tasks use no head.
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.NAME = "TransformerTextualHead"
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.NUM_LAYERS = 1
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.HIDDEN_SIZE = 1024
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.NUM_HEADS = 16
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.FEEDFORWARD_SIZE = 4096
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.DROPOUT = 0.1
    # False: post-norm (paper default); True: pre-norm variant.
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.NORM_FIRST = False
    # Pre-norm only: a LayerNorm after the last layer, so the tied output layer sees normalised
    # features. The reference's pre-norm head has none (imported models set this False).
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.PRE_NORM_FINAL_NORM = True
    # Standard deviation of the normal init of every linear/embedding weight of the head
    # (biases zero). 0.02 is BERT's and the paper's. The visual signal reaches the words
    # through a chain of such matrices (projection, cross-attention values, output), so with
    # 0.02 it starts ~30x weaker than the word embeddings and takes many thousand steps to
    # grow; the few-hundred-step synthetic schedule uses 1/sqrt(HIDDEN_SIZE) instead.
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.INIT_STD = 0.02

    # Caption decoding at inference (eval mode of the captioning tasks).
    _C.MODEL.VIRTEX.DECODER = CN()
    # One of DECODERS: "beam" (paper), "greedy", "nucleus", or the reference implementation's
    # own beam search / nucleus sampling ("reference_beam" / "reference_nucleus"), which
    # imported reference checkpoints need to reproduce the authors' captions token for token.
    _C.MODEL.VIRTEX.DECODER.NAME = "beam"
    _C.MODEL.VIRTEX.DECODER.BEAM_SIZE = 5
    # reference_beam only: candidates kept per beam at each step before the best BEAM_SIZE of
    # all beams are chosen (the reference's per_node_beam_size).
    _C.MODEL.VIRTEX.DECODER.PER_NODE_BEAM_SIZE = 2
    # Maximum number of generated tokens ([EOS] included).
    _C.MODEL.VIRTEX.DECODER.MAX_LENGTH = 30
    # Beam scores are divided by length ** LENGTH_PENALTY; 0 disables it.
    _C.MODEL.VIRTEX.DECODER.LENGTH_PENALTY = 0.0
    # Nucleus sampling keeps the smallest token set whose probability mass reaches TOP_P.
    _C.MODEL.VIRTEX.DECODER.TOP_P = 0.9
    # Seed of nucleus sampling, so sampled captions are reproducible.
    _C.MODEL.VIRTEX.DECODER.SEED = 0
    # Reuse keys/values of earlier positions while decoding (False: recompute the whole prefix
    # at every step; kept for testing and benchmarking only).
    _C.MODEL.VIRTEX.DECODER.USE_CACHE = True

    # Masked language modelling.
    _C.MODEL.VIRTEX.MLM = CN()
    # "reference" (the paper's runs): exactly ceil(MASK_PROBABILITY * n) of the n caption tokens
    # are chosen (a single chosen token always becomes [MASK]); of the chosen,
    # MASK_TOKEN_PROBABILITY become [MASK], REPLACE_PROBABILITY a random token, the rest stay;
    # only [MASK]ed positions are predicted. "bert": each token is chosen with probability
    # MASK_PROBABILITY (at least one), and every chosen position is predicted.
    _C.MODEL.VIRTEX.MLM.RULE = "reference"
    _C.MODEL.VIRTEX.MLM.MASK_PROBABILITY = 0.15
    _C.MODEL.VIRTEX.MLM.MASK_TOKEN_PROBABILITY = 0.85
    _C.MODEL.VIRTEX.MLM.REPLACE_PROBABILITY = 0.1

    # The last BN of every residual branch starts at zero (torchvision's zero_init_residual),
    # as in the reference VirTex backbone. Read by build_virtex_resnet_backbone.
    _C.MODEL.RESNETS.ZERO_INIT_RESIDUAL = True

    # Pretraining augmentation (square crops; the detection mapper ignores these keys).
    _C.INPUT.VIRTEX = CN()
    _C.INPUT.VIRTEX.CROP_SIZE = 224
    _C.INPUT.VIRTEX.CROP_SCALE = (0.2, 1.0)
    _C.INPUT.VIRTEX.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # Horizontal flip also swaps the whole words "left" and "right" in the caption.
    _C.INPUT.VIRTEX.HFLIP_PROBABILITY = 0.5
    _C.INPUT.VIRTEX.COLOR_JITTER = CN()
    _C.INPUT.VIRTEX.COLOR_JITTER.PROBABILITY = 0.8
    _C.INPUT.VIRTEX.COLOR_JITTER.BRIGHTNESS = 0.4
    _C.INPUT.VIRTEX.COLOR_JITTER.CONTRAST = 0.4
    _C.INPUT.VIRTEX.COLOR_JITTER.SATURATION = 0.4
    # Small, because captions name colours.
    _C.INPUT.VIRTEX.COLOR_JITTER.HUE = 0.1
    # False: resize like OpenCV's INTER_LINEAR (bilinear, no antialiasing), as the reference
    # implementation's albumentations pipeline does; True: Pillow's antialiased bilinear (for
    # the random-resized crop computed by torch's uint8 kernel, within one grey level of
    # Pillow's). Applies to the random-resized crop and the evaluation resize.
    _C.INPUT.VIRTEX.RESIZE_ANTIALIAS = True
    # Training crops of plain JPEGs (data/fast_decode.py): with RESIZE_ANTIALIAS, decode at
    # 1/2, 1/4 or 1/8 scale in the DCT domain when the crop is at least twice CROP_SIZE in both
    # sides, so it keeps the output resolution. Pixels differ slightly from a full decode (the
    # DCT-domain downscale is a different low-pass filter), not the crop's geometry. False:
    # always decode the whole image at full size.
    _C.INPUT.VIRTEX.JPEG_DRAFT = True
    # Evaluation: resize the shorter side, then centre-crop a square.
    _C.INPUT.VIRTEX.TEST_RESIZE = 256
    _C.INPUT.VIRTEX.TEST_CROP_SIZE = 224

    # Optimisation extras on top of Detectron2's SOLVER keys (BASE_LR is the CNN's LR).
    _C.SOLVER.VIRTEX = CN()
    # Learning rate of everything that is not the visual backbone (textual head, projections).
    _C.SOLVER.VIRTEX.TEXTUAL_LR = 0.001
    # Parameters whose name matches this regex get no weight decay (the paper: norms and biases
    # of the textual embedding and transformer).
    _C.SOLVER.VIRTEX.NO_DECAY_PATTERN = (
        r"^textual_head\.(embedding|transformer|backward_transformer)\.\S*(norm|bias)"
    )
    # Lookahead (Zhang et al. 2019) around SGD: slow weights move ALPHA towards the fast ones
    # every STEPS iterations.
    _C.SOLVER.VIRTEX.LOOKAHEAD = CN()
    _C.SOLVER.VIRTEX.LOOKAHEAD.ENABLED = True
    _C.SOLVER.VIRTEX.LOOKAHEAD.ALPHA = 0.5
    _C.SOLVER.VIRTEX.LOOKAHEAD.STEPS = 5
    # With LR_SCHEDULER_NAME "WarmupCosineLR": True decays over the iterations after warm-up
    # (the reference's schedule: the cosine starts at 1 when warm-up ends and reaches 0 at
    # MAX_ITER); False is Detectron2's curve, computed from iteration 0 and scaled during warm-up.
    _C.SOLVER.VIRTEX.COSINE_AFTER_WARMUP = True
    # Clip the norm of all gradients together (not per parameter as Detectron2's CLIP_GRADIENTS).
    _C.SOLVER.VIRTEX.CLIP_GRAD_NORM = 10.0
    # True: SGD's fused kernel where PyTorch has one for the device (CPU, CUDA), else its
    # foreach kernel, plus multi-tensor clipping (skipping the no-op rescale below the
    # threshold) and Lookahead. The same numbers to float rounding; the R-50 L1_H1024 update
    # (69M parameters) took ~0.1 s fused against ~0.5 s per tensor and ~0.8 s foreach on a
    # shared 2-core CPU. False: one loop per tensor, as the reference does (for checks).
    _C.SOLVER.VIRTEX.FOREACH = True

    # What SOLVER.AMP.ENABLED means on a CPU (on a GPU it is Detectron2's fp16 AMPTrainer):
    # "auto": bf16 autocast if the CPU computes in bf16 natively (AVX512-BF16, AMX, Arm BF16),
    # else fp32 with a warning in the log; "bfloat16": bf16 autocast even where it is emulated
    # (slower than fp32, for testing numerics); "float32": never autocast on a CPU.
    _C.SOLVER.AMP.CPU_DTYPE = "auto"

    # WebDataset shards (DATASETS.TRAIN entries "webdataset:<pattern>", see data/streaming.py):
    # samples of a shard pass through a shuffle buffer of this many samples (raw bytes, per
    # data-loader worker; the buffer is refilled from the same shard, so memory stays bounded).
    _C.DATALOADER.VIRTEX_SHUFFLE_BUFFER = 1000


def _add_classification_keys(cfg: CN) -> None:
    """Keys of the classification transfer protocols (linear probe, fine-tuning, VOC07 SVMs).

    Defaults are the reference code's values: ImageNet linear probe on a frozen backbone
    (random-resized crop 224 with scale 0.08-1.0 and flips for training; shorter side 256 +
    centre crop 224 for evaluation), and per-class linear SVMs on L2-normalised, globally pooled
    res5 features (shorter side 256, centre crop 224) for PASCAL VOC 2007.
    """
    if "CLASSIFIER" in cfg.MODEL:
        return
    _C = cfg

    # ImageClassifier (virtex_d2.modeling.classifier): a Detectron2 ResNet ``backbone``,
    # global average pooling of one feature map, one linear layer.
    _C.MODEL.CLASSIFIER = CN()
    # Output classes; must equal the number of classes of the training dataset (checked when
    # the train loader is built). ImageNet: 1000, iNaturalist 2018: 8142.
    _C.MODEL.CLASSIFIER.NUM_CLASSES = 1000
    # Backbone output that is pooled (must be in MODEL.RESNETS.OUT_FEATURES); res5 gives the
    # paper's 2048-d features for an R-50.
    _C.MODEL.CLASSIFIER.IN_FEATURE = "res5"
    # True: linear probe. The backbone gets no gradient and stays in eval mode, so its BN
    # statistics do not move. False: the whole network is fine-tuned (iNaturalist protocol).
    _C.MODEL.CLASSIFIER.FREEZE_BACKBONE = True
    # The linear layer starts from N(0, INIT_STD^2) weights and zero bias (reference code).
    _C.MODEL.CLASSIFIER.INIT_STD = 0.01

    # Image transforms of the classification datasets (pixels; images are RGB, INPUT.FORMAT).
    _C.INPUT.CLASSIFICATION = CN()
    # Training: random-resized square crop (torchvision's sampling) + horizontal flip.
    _C.INPUT.CLASSIFICATION.TRAIN_CROP_SIZE = 224
    # Area fraction range of the crop: the reference's ImageNet linear probe and iNaturalist
    # fine-tuning use torchvision's 0.08-1.0 (the pretraining crops use 0.2-1.0).
    _C.INPUT.CLASSIFICATION.TRAIN_CROP_SCALE = (0.08, 1.0)
    _C.INPUT.CLASSIFICATION.TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    _C.INPUT.CLASSIFICATION.HFLIP_PROBABILITY = 0.5
    # Evaluation: shorter side resized to TEST_RESIZE, then the central TEST_CROP_SIZE square.
    _C.INPUT.CLASSIFICATION.TEST_RESIZE = 256
    _C.INPUT.CLASSIFICATION.TEST_CROP_SIZE = 224

    _C.TEST.CLASSIFICATION = CN()
    # Images per process and batch when evaluating (Detectron2 v0.6's test loader is fixed to
    # one image per batch; ours batches because every crop has the same size).
    _C.TEST.CLASSIFICATION.IMS_PER_BATCH = 32
    # Top-k accuracies reported by ClassificationEvaluator (k >= number of classes is skipped).
    _C.TEST.CLASSIFICATION.TOPK = (1, 5)

    # PASCAL VOC 2007 linear SVM protocol (tools/eval_voc07_svm.py), as in the reference code
    # and the benchmark of Goyal et al. (2019) it follows.
    _C.TEST.VOC07_SVM = CN()
    # (train split, test split). SVMs are trained on the first, AP is reported on the second.
    _C.TEST.VOC07_SVM.DATASETS = ("voc_2007_trainval", "voc_2007_test")
    # "shorter": shorter side to RESIZE, then the central CROP_SIZE square (the reference code;
    # its changelog credits this over squashing with 1-2 mAP); "global": the whole image to
    # RESIZE x RESIZE, ignoring its aspect ratio.
    _C.TEST.VOC07_SVM.RESIZE_MODE = "shorter"
    _C.TEST.VOC07_SVM.RESIZE = 256
    # Only used by RESIZE_MODE "shorter".
    _C.TEST.VOC07_SVM.CROP_SIZE = 224
    # SVM costs C tried per class; the one with the best cross-validated AP is kept.
    _C.TEST.VOC07_SVM.COSTS = (0.01, 0.1, 1.0, 10.0)
    # Folds of the cross-validation that picks the cost (stratified, not shuffled).
    _C.TEST.VOC07_SVM.CV_FOLDS = 3
    # class_weight {+1: POSITIVE_WEIGHT, -1: 1}: positives are rare, so they weigh more.
    _C.TEST.VOC07_SVM.POSITIVE_WEIGHT = 2.0
    # sklearn LinearSVC loss: "squared_hinge" (LinearSVC's default, used by the reference
    # code and Goyal et al.) or "hinge".
    _C.TEST.VOC07_SVM.LOSS = "squared_hinge"
    _C.TEST.VOC07_SVM.MAX_ITER = 2000
    # Divide every pooled feature by its L2 norm before the SVMs (reference code).
    _C.TEST.VOC07_SVM.L2_NORMALIZE = True
    # Images per batch for feature extraction (a single process).
    _C.TEST.VOC07_SVM.IMS_PER_BATCH = 64
    # Where pooled features are cached, keyed by checkpoint, extractor settings and dataset.
    # Empty: <OUTPUT_DIR>/feature_cache.
    _C.TEST.VOC07_SVM.CACHE_DIR = ""


def _add_failure_policy_keys(cfg: CN) -> None:
    """Keys of the failure policies (bad data, weight loading); existing values are kept."""
    d = cfg.DATALOADER
    if "VIRTEX_MAX_BAD_FRACTION" not in d:
        # The run stops once more than this fraction of the training records turned out to be
        # unusable (missing, empty, corrupt or undecodable images); below it they are skipped,
        # counted and logged. 0 stops at the first bad record.
        d.VIRTEX_MAX_BAD_FRACTION = 0.01
    if "VIRTEX_CHECK_FILES" not in d:
        # Before training, stat every training image and drop missing or empty files (they count
        # towards VIRTEX_MAX_BAD_FRACTION). Cheap (no decoding); disable for remote file systems
        # where stat is slow.
        d.VIRTEX_CHECK_FILES = True
    m = cfg.MODEL
    if "ALLOW_PICKLE_WEIGHTS" not in m:
        # Load weight files that need Python's pickle (Detectron2's legacy .pkl, or .pth files
        # holding Python objects). Unpickling runs arbitrary code from the file, so this is off:
        # enable it only for files from a source you trust.
        m.ALLOW_PICKLE_WEIGHTS = False
    if "WEIGHTS_REQUIRED" not in m:
        # Which parameters MODEL.WEIGHTS must provide (missing or wrongly shaped ones are an error
        # before the first iteration instead of Detectron2's warning):
        # "all": every parameter; "resnet": every parameter of the ResNet stem and blocks
        # (wherever they are, e.g. roi_heads.res5 in C4 models); "none": no check;
        # "auto": "all" for the VirTex meta-architecture and for --eval-only, else "resnet".
        m.WEIGHTS_REQUIRED = "auto"


def _all_keys(cfg: CN, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.extend(_all_keys(v, f"{prefix}{k}.") if isinstance(v, CN) else [f"{prefix}{k}"])
    return keys


_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
    r"for config key: (\S+)"
)


def _explain(cfg: CN, error: Exception, source: str) -> ConfigError:
    text = str(error).strip("'\"")
    if "Non-existent" in text:  # KeyError from files, AssertionError from overrides
        key = text.split(":")[-1].strip()
        close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.8)
        hint = f" Did you mean {close[0]}?" if close else ""
        return ConfigError(
            f"{source}: unknown config key {key}.{hint} Every key is listed in "
            "detectron2/config/defaults.py and virtex_d2/config.py."
        )
    match = _TYPE_MISMATCH.search(text)
    if match:
        want, got, default, value, key = match.groups()
        article = "an" if want[0] in "aeiou" else "a"
        return ConfigError(
            f"{source}: config key {key} takes {article} {want} (default {default}), got {value!r} "
            f"({got}). Write it like the default, e.g. 64 for an int, 0.1 for a float, "
            "(a, b) for a tuple."
        )
    return ConfigError(f"{source}: {type(error).__name__}: {text}")


def merge_config_checked(cfg: CN, config_file: str | None, opts: Sequence[str] = ()) -> CN:
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, raising
    :class:`ConfigError` with the source, the key and a hint instead of yacs' bare errors."""
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {config_file} does not exist") from e
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _explain(cfg, e, f"config file {config_file}") from e
    if len(opts) % 2:
        raise ConfigError(
            f"command-line overrides must be KEY VALUE pairs; got an odd number: {list(opts)}"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _explain(cfg, e, f"command-line override {key} {value}") from e
    return cfg


def check_config(cfg: CN) -> None:
    """Checks that need the whole config; raises :class:`ConfigError` before any work starts."""
    s = cfg.SOLVER
    if s.MAX_ITER > 0 and s.WARMUP_ITERS >= s.MAX_ITER and s.WARMUP_FACTOR == 0.0:
        raise ConfigError(
            f"SOLVER.WARMUP_ITERS ({s.WARMUP_ITERS}) >= SOLVER.MAX_ITER ({s.MAX_ITER}): the "
            f"learning rate would never leave warm-up (it stays near {s.WARMUP_FACTOR} x "
            f"BASE_LR for the whole run); lower SOLVER.WARMUP_ITERS below {s.MAX_ITER}, e.g. "
            f"SOLVER.WARMUP_ITERS {max(s.MAX_ITER // 10, 0)}"
        )
    mode = cfg.MODEL.WEIGHTS_REQUIRED
    if mode not in WEIGHTS_REQUIRED_CHOICES:
        raise ConfigError(
            f"MODEL.WEIGHTS_REQUIRED must be one of {WEIGHTS_REQUIRED_CHOICES}, got {mode!r}"
        )


def setup_cfg(config_file: str | None, opts: Sequence[str] = (), *, freeze: bool = True) -> CN:
    """Detectron2's defaults + every virtex-d2 key, then ``config_file`` and ``opts`` merged
    with :func:`merge_config_checked`, then :func:`check_config`. Frozen unless asked not to."""
    cfg = get_cfg()
    add_virtex_config(cfg)
    merge_config_checked(cfg, config_file, opts)
    check_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg
