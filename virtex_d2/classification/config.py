"""Config keys of the classification transfer protocols (linear probe, fine-tuning, VOC07 SVMs).

Defaults are the paper's / reference code's values (see ../../shared/virtex-reference.md):
ImageNet linear probe on a frozen backbone (random-resized crop 224 with scale 0.08-1.0 and
flips for training; shorter side 256 + centre crop 224 for evaluation), and per-class linear
SVMs on L2-normalised, globally pooled res5 features for PASCAL VOC 2007.
"""
from detectron2.config import CfgNode as CN


def add_classification_config(cfg: CN) -> None:
    """Add the classification keys to a Detectron2 config, in place (idempotent)."""
    if "CLASSIFIER" in cfg.MODEL:
        return
    _C = cfg

    # ImageClassifier (virtex_d2.classification.meta_arch): a Detectron2 ResNet ``backbone``,
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
