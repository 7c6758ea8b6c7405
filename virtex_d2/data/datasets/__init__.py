"""Dataset registration and loaders (COCO Captions, synthetic shapes, classification).

Importing this package registers the datasets listed in ``datasets/README.md``.
"""

from __future__ import annotations

from . import builtin  # noqa: F401  (registers datasets)
from .builtin import (  # noqa: F401
    CLASSIFICATION_DATASETS,
    COCO_CAPTIONS_DATASETS,
    SYNTHETIC_DATASETS,
    get_datasets_root,
    register_all_virtex_datasets,
    register_classification_datasets,
    register_image_folder,
    register_inat_json,
)
from .classification import (  # noqa: F401
    load_coco_instances_classification,
    load_image_folder,
    load_inat_json,
    load_multilabel_targets,
    load_voc_multilabel,
)
from .coco_captions import load_coco_captions_json  # noqa: F401
from .synthetic import (  # noqa: F401
    COCO_CATEGORIES,
    LVIS_CATEGORY_NAMES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    is_synthetic_dataset_complete,
)
