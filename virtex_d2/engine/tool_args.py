"""The command line shared by the tools that run a trained captioning model
(``tools/caption_images.py``, ``tools/visualize_attention.py``, ``tools/check_grounding.py``),
in the engine layer like Detectron2's ``default_argument_parser``: the tools are loaded by path,
so a module beside them would not be importable."""

from __future__ import annotations

import argparse

from ..config import DECODERS
from .checkpoint import UnsafeCheckpointError, WeightsMismatchError


def model_load_errors() -> tuple[type[BaseException], ...]:
    """What building a :class:`~virtex_d2.engine.predictor.CaptionPredictor` raises for bad
    input (a missing file, a bad config, weights that do not fit or need unpickling): the tools
    report these in one line instead of a traceback."""
    return (FileNotFoundError, ValueError, WeightsMismatchError, UnsafeCheckpointError)


def model_tool_parser(doc: str, input_help: str, output_help: str) -> argparse.ArgumentParser:
    """The arguments shared by the captioning tools (model, input, output, decoder). ``doc``
    is the tool's docstring: its first paragraph becomes the description and everything after
    the second (the usage example) the epilog."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0].strip(),
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="the model's training config")
    parser.add_argument("--weights", required=True, help="Detectron2 checkpoint (.pth)")
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        help="default: the config's MODEL.VIRTEX.DECODER.NAME",
    )
    return parser
