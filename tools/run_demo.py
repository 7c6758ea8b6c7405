#!/usr/bin/env python
"""`make demo`: VirTex pretraining on the embedded synthetic data, transfer to Mask R-CNN, and
a comparison with random init (COCO box/mask AP, LVIS AP), written to output/demo/.

    python tools/run_demo.py                 # quick: <= 15 minutes on 2 idle CPU cores
    python tools/run_demo.py --full          # longer schedules, 3 seeds
    python tools/run_demo.py --ablation      # + the five pretraining tasks, fine-tuned on COCO
    python tools/run_demo.py --output DIR    # default output/demo; re-running continues

Stages run as tools/train_net.py subprocesses (see tools/demo/stages.py); a finished stage
is reused and an interrupted one resumed, so re-running after Ctrl-C picks up where it stopped.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/demo, whichever cwd
from demo.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
