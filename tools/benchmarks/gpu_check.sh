#!/usr/bin/env bash
# The GPU check of issue #14, in one command (about 3-5 minutes on one H100/H200):
#   1. tools/benchmarks/benchmark_pretrain.py: VirTex R-50 L1_H1024 step vs its CNN-only bound (fp16 AMP,
#      as the paper's config), and fp32 vs fp16-AMP steps alternating in one process;
#   2. tools/benchmarks/benchmark_decoding.py: cached vs uncached beam search;
#   3. 50 iterations of Mask R-CNN R-50-FPN fine-tuning with the COCO config
#      (configs/detection/coco_mask_rcnn_R_50_FPN_2x_random.yaml) on the synthetic COCO set
#      (tools/train_net.py with overrides; no evaluation, no precise BN);
# and writes every number, with the GPU's name, to one JSON file.
#
#   tools/benchmarks/gpu_check.sh [--device cuda|cpu] [--smoke] [OUTPUT.json]
#
# OUTPUT.json defaults to $OUT/gpu_check.json when $OUT is set, else output/gpu_check.json.
# --smoke (with --device cpu): every step at toy sizes, to check the script works (the test
# suite runs it); its numbers mean nothing. PYTHON overrides the interpreter (default
# .venv/bin/python, else python).
set -euo pipefail

cd "$(dirname "$0")/../.."
DEVICE=cuda
SMOKE=0
OUTPUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) OUTPUT="$1"; shift ;;
    esac
done
if [[ -z "$OUTPUT" ]]; then
    OUTPUT="${OUT:-output}/gpu_check.json"
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUTPUT")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ "$DEVICE" == cuda* ]]; then
    # Fail in seconds, not after minutes of CPU fallback, when the GPU is not usable.
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA")'
fi

if [[ $SMOKE == 1 ]]; then
    PRETRAIN=(--smoke --config-file configs/synthetic/bicaptioning_R_18.yaml)
    DECODING=(--smoke)
    # 3 iterations: Detectron2's IterationTimer reports s/iter from the third on.
    FINETUNE=(SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 3 INPUT.MIN_SIZE_TRAIN "(64,)"
              INPUT.MAX_SIZE_TRAIN 64 MODEL.RPN.PRE_NMS_TOPK_TRAIN 200
              MODEL.RPN.POST_NMS_TOPK_TRAIN 100 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 64
              DATALOADER.NUM_WORKERS 0)
else
    PRETRAIN=(--batch-size 64 --iters 10 --warmup 3 --skip-loader)
    DECODING=(--repeats 3)
    FINETUNE=(SOLVER.IMS_PER_BATCH 16 SOLVER.MAX_ITER 50 DATALOADER.NUM_WORKERS 8)
fi

echo "== 1/3 pretraining step: VirTex vs CNN bound, fp32 vs mixed precision ($DEVICE)"
"$PYTHON" tools/benchmarks/benchmark_pretrain.py --device "$DEVICE" --json "$WORK/pretrain.json" \
    "${PRETRAIN[@]}"

echo "== 2/3 beam search: cached vs uncached ($DEVICE)"
"$PYTHON" tools/benchmarks/benchmark_decoding.py --device "$DEVICE" --json "$WORK/decoding.json" \
    "${DECODING[@]}"

echo "== 3/3 Mask R-CNN R-50-FPN fine-tuning, COCO config, synthetic COCO ($DEVICE)"
START=$(date +%s.%N)
"$PYTHON" tools/train_net.py \
    --config-file configs/detection/coco_mask_rcnn_R_50_FPN_2x_random.yaml \
    MODEL.DEVICE "$DEVICE" MODEL.ROI_HEADS.NUM_CLASSES 7 \
    DATASETS.TRAIN '("synthetic_coco_train",)' DATASETS.TEST '()' \
    TEST.PRECISE_BN.ENABLED False TEST.EVAL_PERIOD 0 SOLVER.CHECKPOINT_PERIOD 100000 \
    SOLVER.WARMUP_ITERS 10 OUTPUT_DIR "$WORK/finetune" "${FINETUNE[@]}" \
    > "$WORK/finetune.log" 2>&1 || { tail -n 40 "$WORK/finetune.log" >&2; exit 1; }
END=$(date +%s.%N)

"$PYTHON" - "$WORK" "$OUTPUT" "$DEVICE" "$SMOKE" "$START" "$END" <<'PYEOF'
"""Merge the three reports into one JSON, with the GPU name and the fine-tuning numbers."""
import json
import re
import sys
from importlib.metadata import version
from pathlib import Path

work, output, device, smoke, start, end = sys.argv[1:]
if device.startswith("cuda"):
    import torch  # only here: importing it costs seconds, which the CPU smoke run can spare

    gpu, cuda = torch.cuda.get_device_name(), torch.version.cuda
else:
    gpu = cuda = None
work = Path(work)
rows = [json.loads(line) for line in (work / "finetune" / "metrics.json").read_text().splitlines()
        if line.strip()]
timed = [r for r in rows if "time" in r]
losses = [r for r in rows if "total_loss" in r]
last = losses[-1] if losses else {}
# "Overall training speed: 48 iterations in 0:00:30 (0.6250 s / it)" (after the first 2).
speed = re.search(r"Overall training speed: .*\(([0-9.]+) s / it\)",
                  (work / "finetune.log").read_text())
report = {
    "gpu": gpu,
    "device": device,
    "smoke": smoke == "1",
    "torch": version("torch"),
    "cuda": cuda,
    "pretrain": json.loads((work / "pretrain.json").read_text()),
    "decoding": json.loads((work / "decoding.json").read_text()),
    "finetune_mask_rcnn_R_50_FPN": {
        "iterations": max(r["iteration"] for r in rows) + 1,
        "wall_s_including_startup": float(end) - float(start),
        "s_per_iter_overall": float(speed.group(1)) if speed else None,
        # Detectron2's "time" is the median seconds per iteration over its logging window.
        "s_per_iter_last_window": timed[-1]["time"] if timed else None,
        "total_loss_last": last.get("total_loss"),
        "max_mem_mb": last.get("max_mem"),
    },
}
Path(output).write_text(json.dumps(report, indent=2))
print(json.dumps({k: report[k] for k in ("gpu", "device", "smoke")}))
PYEOF
echo "wrote $OUTPUT"
