"""Config keys of the failure policies (bad data, weight loading), and config merging whose
errors name the file, the key and the fix.

``add_engine_config`` is called by ``virtex_d2.add_virtex_config``; the Trainer also calls it on
its own copy of the config, so a config built without it still gets these defaults.
"""
from __future__ import annotations

import difflib
import re
from typing import Sequence

from detectron2.config import CfgNode as CN

WEIGHTS_REQUIRED_CHOICES = ("auto", "all", "resnet", "none")


class ConfigError(ValueError):
    """A config file or command-line override that cannot be applied."""


def add_engine_config(cfg: CN) -> None:
    """Add the keys of this module to ``cfg`` in place (idempotent; existing values are kept)."""
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
