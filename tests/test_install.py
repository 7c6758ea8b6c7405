"""The installed environment: detectron2's Python-only build and its compatibility fixes."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import PIL
import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import build_detectron2  # noqa: E402


def test_versions_are_current():
    assert int(np.__version__.split(".")[0]) >= 2
    assert int(PIL.__version__.split(".")[0]) >= 10


def test_detectron2_modeling_imports_without_monkeypatching():
    import detectron2.modeling  # noqa: F401
    from PIL import Image

    import virtex_d2  # noqa: F401

    # The fixes live inside the detectron2 build; the user's numpy/PIL stay untouched.
    assert not hasattr(Image, "LINEAR")
    assert not hasattr(np, "float") and not hasattr(np, "int")


def test_polygon_masks_and_transforms_work_with_numpy2_and_pillow10():
    import torch
    from detectron2.data import transforms as T
    from detectron2.structures import BitMasks, PolygonMasks

    masks = PolygonMasks([[np.array([1, 1, 8, 1, 8, 8, 1, 8], dtype=np.float64)]])
    bitmask = BitMasks.from_polygon_masks(masks, 10, 10)
    assert bitmask.tensor.dtype == torch.bool and int(bitmask.tensor.sum()) > 30
    img = np.zeros((20, 30, 3), np.uint8)
    out = T.ExtentTransform((0, 0, 30, 20), (10, 15)).apply_image(img)
    assert out.shape == (10, 15, 3)


def test_model_zoo_configs_resolve_without_pkg_resources():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert path.endswith(".yaml")


def test_missing_compiled_op_fails_only_when_used_and_says_how_to_fix():
    import torch
    from detectron2 import _C
    from detectron2.layers import ModulatedDeformConv, nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    if not getattr(_C, "IS_PYTHON_ONLY_BUILD", False):
        pytest.skip("a full detectron2 build with compiled ops is installed")
    ModulatedDeformConv(4, 4, 3, padding=1)  # building (and importing) works
    # What the CUDA path of (Modulated)DeformConv calls:
    with pytest.raises(
        RuntimeError, match="modulated_deform_conv_forward.*compiled.*build detectron2"
    ):
        _C.modulated_deform_conv_forward
    with pytest.raises(RuntimeError, match="nms_rotated"):
        nms_rotated(torch.zeros(2, 5), torch.zeros(2), 0.5)
    with pytest.raises(RuntimeError, match="box_iou_rotated"):
        pairwise_iou_rotated(torch.zeros(2, 5), torch.zeros(2, 5))
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_tampered_sdist_is_refused(tmp_path):
    tampered = tmp_path / build_detectron2.SDIST_NAME
    tampered.write_bytes(b"not the published archive")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_detectron2.py"),
            "--sdist",
            str(tampered),
            "--verify-only",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "refusing" in proc.stderr and build_detectron2.SDIST_SHA256 in proc.stderr


def test_downloaded_sdist_matches_the_pinned_digest():
    cached = REPO / "build" / "detectron2" / build_detectron2.SDIST_NAME
    if not cached.exists():
        pytest.skip(f"{cached} is not here (detectron2 was installed another way)")
    build_detectron2.verify_sdist(cached)  # raises on a mismatch


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_build_is_recognised_as_up_to_date():
    found = build_detectron2.installed_detectron2()
    assert found is not None
    version, full = found
    assert (
        full
        or version
        == f"{build_detectron2.BUILD_VERSION} (patch level {build_detectron2.PATCH_LEVEL})"
    )
    importlib.import_module("detectron2")
