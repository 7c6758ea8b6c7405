"""Every config key virtex-d2 adds to Detectron2's config, with the paper's defaults.

Defaults describe the paper's base pretraining run (bicaptioning, R-50, L1_H1024_A16_F4096,
COCO Captions, 10K vocabulary); see ../shared/virtex-reference.md. Architectures are given as
explicit integers, never encoded in names.
"""
from detectron2.config import CfgNode as CN

PRETRAINING_TASKS = (
    "bicaptioning",
    "captioning",
    "token_classification",
    "multilabel_classification",
    "masked_lm",
)
# The tasks whose textual head generates captions (left to right).
CAPTIONING_TASKS = ("bicaptioning", "captioning")


def add_virtex_config(cfg: CN) -> None:
    """Add every VirTex key to a Detectron2 config, in place (idempotent)."""
    from .classification.config import add_classification_config

    add_classification_config(cfg)
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
    # Standard deviation of the normal init of every linear/embedding weight of the head
    # (biases zero). 0.02 is BERT's and the paper's. The visual signal reaches the words
    # through a chain of such matrices (projection, cross-attention values, output), so with
    # 0.02 it starts ~30x weaker than the word embeddings and takes many thousand steps to
    # grow; the few-hundred-step synthetic schedule uses 1/sqrt(HIDDEN_SIZE) instead.
    _C.MODEL.VIRTEX.TEXTUAL_HEAD.INIT_STD = 0.02

    # Caption decoding at inference (eval mode of the captioning tasks).
    _C.MODEL.VIRTEX.DECODER = CN()
    # "beam" (paper), "greedy" or "nucleus".
    _C.MODEL.VIRTEX.DECODER.NAME = "beam"
    _C.MODEL.VIRTEX.DECODER.BEAM_SIZE = 5
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

    # Masked language modelling (BERT recipe).
    _C.MODEL.VIRTEX.MLM = CN()
    _C.MODEL.VIRTEX.MLM.MASK_PROBABILITY = 0.15
    # Of the selected tokens: this fraction becomes [MASK], REPLACE_PROBABILITY a random token,
    # the rest stays unchanged.
    _C.MODEL.VIRTEX.MLM.MASK_TOKEN_PROBABILITY = 0.8
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
    # Clip the norm of all gradients together (not per parameter as Detectron2's CLIP_GRADIENTS).
    _C.SOLVER.VIRTEX.CLIP_GRAD_NORM = 10.0
    # Use torch.optim.SGD's fused/foreach kernels when available.
    _C.SOLVER.VIRTEX.FOREACH = True

    # WebDataset shards (DATASETS.TRAIN entries "webdataset:<pattern>", see data/streaming.py):
    # samples of a shard pass through a shuffle buffer of this many samples (raw bytes, per
    # data-loader worker; the buffer is refilled from the same shard, so memory stays bounded).
    _C.DATALOADER.VIRTEX_SHUFFLE_BUFFER = 1000

    # Failure-handling keys (bad-data threshold, pickle opt-in, weight-loading checks).
    from .engine.config import add_engine_config  # imported here: engine imports data/modeling

    add_engine_config(_C)
