from __future__ import annotations

from setuptools import find_packages, setup

setup(
    name="virtex-d2",
    version="0.1.0",
    description="VirTex (visual pretraining from captions) as a Detectron2 extension",
    packages=find_packages(include=["virtex_d2", "virtex_d2.*"]),
    python_requires=">=3.9",
    # Pinned, tested versions live in requirements.txt (installed by `make install`);
    # detectron2 is not on PyPI, see tools/build_detectron2.py.
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools",
        "tokenizers",
        "hotcoco",
        "pycocoevalcap",
    ],
)
