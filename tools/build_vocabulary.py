#!/usr/bin/env python
"""Learn a lower-cased sub-word (BPE) vocabulary from COCO-format caption files.

    python tools/build_vocabulary.py --captions datasets/coco/annotations/captions_train2017.json \\
        --vocab-size 10000 --output datasets/vocab/coco_10k.json

Special ids: [UNK]/padding 0, [SOS] 1, [EOS] 2, [MASK] 3. Point MODEL.VIRTEX.TOKENIZER at the
output and set MODEL.VIRTEX.VOCAB_SIZE to the size printed here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from virtex_d2.data.tokenizer import train_vocabulary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", nargs="+", required=True, help="COCO captions json file(s)")
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--output", required=True, help="tokenizer json to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tok = train_vocabulary(args.captions, args.vocab_size, args.output)
    except (OSError, ValueError) as e:
        print(f"build_vocabulary: error: {e}", file=sys.stderr)
        return 1
    sample = "A man riding a wave on top of a surfboard."
    ids = tok.encode(sample)
    print(f"{len(tok)} tokens -> {args.output}")
    print(f"example: {sample!r} -> {[tok.id_to_token(i) for i in ids]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
