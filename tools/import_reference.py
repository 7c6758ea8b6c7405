#!/usr/bin/env python
"""Import a checkpoint of the reference VirTex implementation (kdexd/virtex) into virtex-d2.

    python tools/import_reference.py --checkpoint bicaptioning_R_50_L1_H2048.pth \\
        --config bicaptioning_R_50_L1_H2048.yaml --vocab coco_10k.model --output imported/

Writes OUTPUT/config.yaml (a complete virtex-d2 config naming the weights and vocabulary),
OUTPUT/model_final.pth (tensors only) and OUTPUT/vocab.json. Every tool then takes the
directory's files, e.g.:

    python tools/caption_images.py --config-file imported/config.yaml \\
        --weights imported/model_final.pth --input photos/ --output captions.json

Any of the five pretraining tasks, torchvision ResNet-18/34/50/101/152 and wide ResNet
backbones, post-norm and pre-norm textual heads of any size. Captioning models decode with the
reference's own beam search (MODEL.VIRTEX.DECODER.NAME reference_beam), so they write the
authors' captions token for token. An unknown config key, a value virtex-d2 cannot express or a
checkpoint tensor that does not fit stops the import with a message naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from virtex_d2.checkpoint.convert import IncompleteBackboneError
from virtex_d2.checkpoint.reference import ReferenceImportError
from virtex_d2.data.spm_vocabulary import VocabularyImportError
from virtex_d2.engine.reference_import import import_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="reference checkpoint (.pth)")
    parser.add_argument("--config", required=True, help="its config, in the reference's format")
    parser.add_argument(
        "--vocab",
        help="its SentencePiece .model (tasks with a textual head; "
        "default: the config's DATA.TOKENIZER_MODEL, also looked for next to it)",
    )
    parser.add_argument("--output", required=True, help="directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = import_reference(args.checkpoint, args.config, args.vocab, args.output)
    except (
        ReferenceImportError,
        VocabularyImportError,
        IncompleteBackboneError,
        FileNotFoundError,
        RuntimeError,
        TypeError,
    ) as e:
        print(f"import_reference: error: {e}", file=sys.stderr)
        return 2
    print(
        f"imported a {result.task} model:\n  config:  {result.config}\n"
        f"  weights: {result.weights}"
        + (f"\n  vocab:   {result.vocabulary}" if result.vocabulary else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
