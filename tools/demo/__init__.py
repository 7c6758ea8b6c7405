"""``make demo``: pretrain VirTex on the synthetic data, transfer it, compare with random init.

A tool, not part of the installed ``virtex_d2`` package: it drives ``tools/train_net.py`` by
path and is imported by ``tools/run_demo.py`` (and the tests) from this folder.

Modules:
- :mod:`.plan`: the stages of a run (quick / full / smoke schedules, the optional ablation);
- :mod:`.stages`: running one stage (a ``tools/train_net.py`` subprocess) with progress, reuse
  of finished stages and ``--resume`` of interrupted ones;
- :mod:`.results`: reading metrics.json, seed means, ``results.json``;
- :mod:`.plots` and :mod:`.report`: PNGs, captions and ``report.md``;
- :mod:`.pipeline`: the command line (``tools/run_demo.py``).
"""

from __future__ import annotations
