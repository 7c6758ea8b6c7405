"""Dataset registration and loaders (COCO Captions, synthetic shapes).

Importing this package registers the datasets listed in ``datasets/README.md``.
"""
from . import builtin  # noqa: F401  (registers datasets)
from .builtin import (  # noqa: F401
    COCO_CAPTIONS_DATASETS,
    SYNTHETIC_DATASETS,
    get_datasets_root,
    register_all_virtex_datasets,
)
from .coco_captions import load_coco_captions_json  # noqa: F401
from .synthetic import (  # noqa: F401
    COCO_CATEGORIES,
    LVIS_CATEGORY_NAMES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    is_synthetic_dataset_complete,
)
