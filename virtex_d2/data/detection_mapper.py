"""Detection fine-tuning maps records with Detectron2's own ``DatasetMapper`` and ``read_image``.

This name only keeps ``engine/trainer.py`` importable until it uses ``DatasetMapper`` directly
(its owner is switching it); nothing else may import this module, and it goes away then.
A file ``read_image`` cannot decode raises in the mapper, and the resumable training loader
counts it as a bad sample (``data.resumable``).
"""
from detectron2.data import DatasetMapper as RobustDatasetMapper  # noqa: F401
