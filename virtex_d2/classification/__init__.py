"""Classification transfer: linear probe, fine-tuning and VOC07 SVMs on Detectron2 ResNets.

Importing this package registers ``ImageClassifier`` in ``META_ARCH_REGISTRY`` and the
classification datasets (``imagenet_*``, ``inat2018_*``, ``synthetic_cls_*``).
"""
from . import datasets  # noqa: F401  (registers datasets)
from . import meta_arch  # noqa: F401  (registers ImageClassifier)
from .datasets import (  # noqa: F401
    load_coco_instances_classification,
    load_image_folder,
    load_inat_json,
    load_multilabel_targets,
    load_voc_multilabel,
    register_classification_datasets,
    register_image_folder,
    register_inat_json,
)
from .mapper import (  # noqa: F401
    ClassificationDatasetMapper,
    build_classification_optimizer,
    build_classification_test_loader,
    build_classification_train_loader,
)
from .meta_arch import ImageClassifier  # noqa: F401
