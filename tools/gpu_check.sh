#!/usr/bin/env bash
# The GPU session's checks and figures, in one device call (tool library: device):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600)
# .whl holds the wheels the GPU image lacks (av, decord, websockets, starlette, uvicorn, greenlet, qwen-vl-utils for cp312; the image has
# prometheus-client; see the device README for the pip download line). Writes logs, bench JSON and markdown to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv

# GPU and torchvision tests first: CUDA graphs, bf16 builtin answers, the batched vision tower on this
# transformers, transformers' video processor loaded from a published-layout checkpoint,
# the torchvision video-processor comparisons, and the bench smoke run.
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_decode.py tests/test_vision.py tests/test_video_io.py \
    tests/test_batching.py tests/test_checkpoints.py tests/test_bench.py tests/test_builtin_model.py -k "not training" 2>&1 | tee "$OUT/tests.log"

# Packed answer steps of the service's executor at batch 1, 8, 32, eager and as the static seats' CUDA graphs (issue 32:
# on a GPU a step for 32 sessions should cost about what one does).
timeout 150 python3 tools/decode_batch_curve.py --model qwen2-vl-7b-random --device cuda --batches 1,8,32 --modes eager,graphs \
    2>&1 | tee "$OUT/decode_batch_curve_7b.md"
# Chunks of 8 sessions ingested one at a time and together (issue 32: their probe forwards packed, eager, against
# the static decoder's CUDA graphs one session at a time).
timeout 120 python3 tools/ingest_together.py --model qwen2-vl-7b-random --device cuda --sessions 2,8 --chunk-frames 8 \
    --repeats 1 2>&1 | tee "$OUT/ingest_together_7b.md"
# The 7B figures: the paper's EMLoC preset, then the search-free path at 10% retention.
timeout 200 python3 -m streamer bench --model qwen2-vl-7b-random --out "$OUT/bench_7b.json" \
    --markdown "$OUT/bench_7b.md" 2>&1 | tee "$OUT/bench_7b.log"
timeout 100 python3 -m streamer bench --model qwen2-vl-7b-random --fixed-ratios 0.1 --policies emloc \
    --out "$OUT/bench_7b_fixed.json" --markdown "$OUT/bench_7b_fixed.md" 2>&1 | tee "$OUT/bench_7b_fixed.log"
# The probe without generated answer tokens (each costs a weight-bound decode step per chunk).
timeout 100 python3 -m streamer bench --model qwen2-vl-7b-random --policies emloc --answer-tokens 0 \
    --out "$OUT/bench_7b_probe0.json" --markdown "$OUT/bench_7b_probe0.md" 2>&1 | tee "$OUT/bench_7b_probe0.log"
# Last, if time is left: Qwen2.5-VL-7B (windowed vision tower, time-following positions), full and emloc.
timeout 120 python3 -m streamer bench --model qwen2.5-vl-7b-random --policies full,emloc \
    --out "$OUT/bench_25_7b.json" --markdown "$OUT/bench_25_7b.md" 2>&1 | tee "$OUT/bench_25_7b.log"
# Then Qwen3-VL-8B (learned position embeddings, DeepStack, each frame pair's time as text), full and emloc.
timeout 120 python3 -m streamer bench --model qwen3-vl-8b-random --policies full,emloc \
    --out "$OUT/bench_3_8b.json" --markdown "$OUT/bench_3_8b.md" 2>&1 | tee "$OUT/bench_3_8b.log"
