#!/usr/bin/env bash
# One prepared GPU check for a lent H200 (budget 15 min; this takes well under 8): tokens/s, bf16 MFU and peak
# memory at the `small` size for EBT and Transformer++, EBT peak memory per checkpointing policy, and the EBT
# step under distributed.strategy=fsdp (FSDP2 with bf16 mixed precision, and fsdp_regather) on a 1-rank mesh.
# Writes gpu_step.json to $OUT (or benchmarks/results/ when OUT is unset). Run from the repository root:
#   bash benchmarks/gpu_step.sh            # on the GPU machine
#   bash benchmarks/gpu_step.sh --tiny     # seconds-long CPU check of the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
# The device machine has no network: import the working tree directly instead of installing it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Not every image has a `python` alias; PYTHON overrides.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
"$PY" -c "import torch, ebt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU check"
export PYTHONUNBUFFERED=1
timeout 450 "$PY" -m benchmarks.gpu_step "$@"
