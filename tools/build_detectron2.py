#!/usr/bin/env python
"""Install detectron2 v0.6 as a Python-only build into the running interpreter's environment.

Detectron2 has no release on PyPI. PyPI does carry an unmodified re-upload of the v0.6 source
(``pb1-detectron2==0.6``), whose ``setup.py`` cannot be used: it always compiles C++ sources that
the archive does not contain. This script therefore

1. keeps an existing *full* detectron2 build (one with its compiled ``detectron2._C``) untouched;
2. downloads the sdist (or takes ``--sdist FILE``) and refuses it unless its sha256 matches the
   pinned digest below;
3. extracts the ``detectron2`` package and fixes, inside that copy only, what breaks with
   today's libraries (Pillow >= 10, numpy >= 1.24, setuptools without ``pkg_resources``, the
   missing ``_C`` extension) so nothing is monkeypatched at run time;
4. builds a pure-Python wheel named ``detectron2`` (version ``0.6+pyonly``) and pip-installs it.

Only the standard library is used, so this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
SIMPLE_INDEX = "https://pypi.org/simple/pb1-detectron2/"
BUILD_VERSION = "0.6+pyonly"
# Bump when the patches below change, so `make install` rebuilds an outdated build.
PATCH_LEVEL = "3"

# Runtime requirements of the Python-only build. The sdist's own list also pins black==21.4b2
# (only used by LazyConfig.save, incompatible with current click) and caffe2-only packages.
INSTALL_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

FULL_BUILD_HINT = (
    "build detectron2 from its source with the compiled ops "
    "(python -m pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
    " or a local clone), then re-run `make install`, which keeps a full build"
)

# Replaces the compiled extension. Attribute access names the op and the fix; the three
# version helpers keep detectron2.utils.collect_env (printed by default_setup) working.
STUB_C_MODULE = '''"""Stand-in for detectron2's compiled extension (Python-only build made by virtex-d2).

Every compiled op raises MissingCompiledOpError when *used*; importing never fails.
"""

IS_PYTHON_ONLY_BUILD = True

_DESCRIPTIONS = {
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated-box IoU (pairwise_iou_rotated)",
    "nms_rotated": "rotated-box NMS (nms_rotated)",
    "roi_align_rotated_forward": "rotated RoIAlign (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated RoIAlign (ROIAlignRotated)",
    "InstanceAnnotation": "detectron2's fast COCOeval (COCOeval_opt)",
    "COCOevalEvaluateImages": "detectron2's fast COCOeval (COCOeval_opt)",
    "COCOevalAccumulate": "detectron2's fast COCOeval (COCOeval_opt)",
}


class MissingCompiledOpError(RuntimeError):
    """A compiled detectron2 op was used with a Python-only detectron2 build."""


def missing(name):
    what = _DESCRIPTIONS.get(name, name)
    extra = ""
    if "COCOeval" in what:
        extra = (
            " For COCO evaluation without it, pass use_fast_impl=False to COCOEvaluator, "
            "or use virtex_d2's evaluators (faster-coco-eval)."
        )
    return MissingCompiledOpError(
        f"detectron2 op '{name}' ({what}) needs detectron2's compiled extension, which this "
        f"Python-only build (0.6+pyonly) does not have. To use it, {HINT}.{extra}"
    )


HINT = %r


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise missing(name)


def get_compiler_version():
    return "none (Python-only detectron2 build)"


def get_cuda_version():
    return "none (Python-only detectron2 build)"


def has_cuda():
    return False
''' % (FULL_BUILD_HINT,)

SETUP_PY = """from setuptools import find_packages, setup

setup(
    name="detectron2",
    version=%r,
    description="Detectron2 v0.6, Python-only build (no compiled ops), made by virtex-d2",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={
        "detectron2": ["_virtex_d2_patch_level"],
        "detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"],
    },
    license_files=["LICENSE"],
    python_requires=">=3.8",
    install_requires=%r,
)
"""


class BuildError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sdist(path: Path) -> None:
    """Raise BuildError unless ``path`` is exactly the pinned sdist."""
    actual = sha256_of(path)
    if actual != SDIST_SHA256:
        raise BuildError(
            f"refusing {path}: its sha256 is {actual}, expected {SDIST_SHA256} "
            f"(the published {SDIST_NAME}). The file is corrupt or was tampered with; delete it "
            "and re-run `make install` to download it again."
        )


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)


def download_sdist(dest_dir: Path) -> Path:
    dest = dest_dir / SDIST_NAME
    if dest.exists():
        return dest
    print(f"[build_detectron2] looking up {SDIST_NAME} on {SIMPLE_INDEX}", flush=True)
    with urllib.request.urlopen(SIMPLE_INDEX, timeout=60) as r:
        parser = _LinkParser()
        parser.feed(r.read().decode("utf-8"))
    urls = [u for u in parser.links if u.split("#")[0].endswith("/" + SDIST_NAME)]
    if not urls:
        raise BuildError(f"{SDIST_NAME} is not listed on {SIMPLE_INDEX}")
    url = urls[0].split("#")[0]
    tmp = dest.with_suffix(".part")
    dest_dir.mkdir(parents=True, exist_ok=True)
    print(f"[build_detectron2] downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    tmp.replace(dest)
    return dest


def _sub(path: Path, pattern: str, repl: str, count_expected: int | None = None) -> None:
    text = path.read_text()
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if n == 0 or (count_expected is not None and n != count_expected):
        raise BuildError(f"patch '{pattern}' matched {n} times in {path}; is this detectron2 v0.6?")
    path.write_text(new)


def patch_tree(pkg: Path) -> None:
    """Make the v0.6 sources work with Pillow >= 10, numpy 2, setuptools >= 81, no ``_C``."""
    (pkg / "_C.py").write_text(STUB_C_MODULE)
    # Rotated NMS is dispatched through torch.ops, which would fail with an opaque message.
    _sub(
        pkg / "layers/nms.py",
        r"return torch\.ops\.detectron2\.nms_rotated\(boxes, scores, iou_threshold\)",
        "from detectron2 import _C\n\n"
        "    if getattr(_C, 'IS_PYTHON_ONLY_BUILD', False):\n"
        "        raise _C.missing('nms_rotated')\n"
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)",
        1,
    )
    # Pillow 10 removed the LINEAR alias (it was always BILINEAR).
    _sub(pkg / "data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR", 1)
    # numpy 1.24 removed the deprecated builtin-type aliases.
    alias = r"\bnp\.(bool|int|float|str|object)\b(?!_)"
    for rel in [
        "structures/masks.py",
        "data/build.py",
        "data/datasets/pascal_voc.py",
        "evaluation/pascal_voc_evaluation.py",
        "evaluation/sem_seg_evaluation.py",
        "utils/visualizer.py",
        "utils/video_visualizer.py",
    ]:
        _sub(pkg / rel, alias, r"\1")
    leftovers = [
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if re.search(r"^[^#\n]*" + alias, p.read_text(), re.M)
    ]
    if leftovers:
        raise BuildError(f"numpy aliases left unpatched in {leftovers}")
    # setuptools >= 81 no longer ships pkg_resources; the configs sit next to the module.
    zoo = pkg / "model_zoo/model_zoo.py"
    _sub(zoo, r"^import pkg_resources\n", "", 1)
    _sub(
        zoo,
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\", "
        r"os\.path\.join\(\"configs\", config_path\)\s*\)",
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    )


def installed_detectron2() -> tuple[str, bool] | None:
    """Return (version, is_full_build) of the detectron2 importable here, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    compiled = [p for p in pkg_dir.glob("_C*") if p.suffix in (".so", ".pyd")]
    from importlib import metadata

    try:
        version = metadata.version("detectron2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    stamp = pkg_dir / "_virtex_d2_patch_level"
    if not compiled and stamp.exists():
        version = f"{version} (patch level {stamp.read_text().strip()})"
    return version, bool(compiled)


def build_and_install(sdist: Path, work: Path, pip_args: list[str]) -> None:
    src = work / "src"
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers() if "/detectron2/" in m.name or m.name.endswith("/LICENSE")
        ]
        for m in members:
            if m.issym() or m.islnk() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise BuildError(f"unexpected archive member {m.name!r} in {sdist}")
        tar.extractall(src, members=members, filter="data")
    (root,) = list(src.iterdir())
    pkg = root / "detectron2"
    patch_tree(pkg)
    (pkg / "_virtex_d2_patch_level").write_text(PATCH_LEVEL + "\n")
    (root / "setup.py").write_text(SETUP_PY % (BUILD_VERSION, INSTALL_REQUIRES))
    wheels = work / "wheels"
    print("[build_detectron2] building the Python-only wheel", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(root),
        ],
        check=True,
    )
    (wheel,) = list(wheels.glob("detectron2-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--force-reinstall",
            "--no-deps",
            "-q",
            str(wheel),
            *pip_args,
        ],
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="use this sdist instead of downloading it")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("build/detectron2"),
        help="where the downloaded sdist is kept (default: build/detectron2)",
    )
    parser.add_argument(
        "--verify-only", action="store_true", help="only check the sdist's sha256 and exit"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)

    try:
        if not args.verify_only and not args.force:
            found = installed_detectron2()
            if found and found[1]:
                print(
                    f"[build_detectron2] keeping the installed full detectron2 build "
                    f"({found[0]}, with compiled ops)"
                )
                return 0
            if found and found[0] == f"{BUILD_VERSION} (patch level {PATCH_LEVEL})":
                print(f"[build_detectron2] detectron2 {found[0]} is up to date")
                return 0
        sdist = args.sdist or download_sdist(args.cache_dir)
        verify_sdist(sdist)
        print(f"[build_detectron2] {sdist}: sha256 verified")
        if args.verify_only:
            return 0
        importlib.invalidate_caches()
        with tempfile.TemporaryDirectory(prefix="detectron2-build-") as tmp:
            build_and_install(sdist, Path(tmp), [])
        print(f"[build_detectron2] installed detectron2 {BUILD_VERSION} (Python-only)")
        return 0
    except BuildError as e:
        print(f"[build_detectron2] ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
