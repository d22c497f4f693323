#!/bin/bash
# Lumina-mGPT 2.0 training on extracted features, on ms-mm (MindSpeed-MM script layout; msrun
# instead of torchrun). Run from the repository root, after feature_extract/feature_extraction.sh:
#     bash examples/mindspore/lumina/mgpt2/pretrain.sh
# Without LOAD_PATH it runs the embedded default (tiny Lumina-mGPT 2.0 + the features of the bundled
# demo images, see docs/lumina_mgpt2.md); sample from the result with
#     python -m ms_mm.models.lumina_mgpt2.sample --load $SAVE_PATH --prompt "..." --out img.png
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "${SCRIPT_DIR}/../../../.." && pwd)${PYTHONPATH:+:${PYTHONPATH}}"

# Ascend toolkit environment, when installed (modify the path to your CANN install)
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then source /usr/local/Ascend/ascend-toolkit/set_env.sh; fi
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export TASK_QUEUE_ENABLE=2
export COMBINED_ENABLE=1
export CPU_AFFINITY_CONF=1
export HCCL_CONNECT_TIMEOUT=1200

NPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=6000
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

TP=1
PP=1
VP=1
CP=1
MBS=1
GRAD_ACC_STEP=1
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

MM_DATA="${MM_DATA:-${SCRIPT_DIR}/feature_data.json}"
MM_MODEL="${MM_MODEL:-${SCRIPT_DIR}/model.json}"
MM_TOOL="${SCRIPT_DIR}/feature_extract/tools.json"
LOAD_PATH="./Lumina/Lumina-mGPT-2.0-mm-convert/"
SAVE_PATH="./lumina_mgpt2_ckpt"
LOG_PATH="msrun_log"

DISTRIBUTED_ARGS="
    --local_worker_num $NPUS_PER_NODE \
    --worker_num $WORLD_SIZE \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT \
    --log_dir $LOG_PATH \
    --join True
"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --virtual-pipeline-model-parallel-size ${VP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-workers 8 \
    --lr 2e-5 \
    --min-lr 2e-5 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --adam-eps 1e-8 \
    --lr-decay-style constant \
    --weight-decay 1e-2 \
    --lr-warmup-init 0 \
    --lr-warmup-iters 0 \
    --clip-grad 1.0 \
    --train-iters 5000 \
    --no-gradient-accumulation-fusion \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --bf16 \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 10000 \
    --eval-iters 10 \
    --load $LOAD_PATH \
    --save $SAVE_PATH \
    --ckpt-format torch_dist \
"

logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
# ms_mm.training.launch checks the weights (embedded default when absent), the parallel sizes and
# model.json's fsdp1 switch, then starts ms_mm/training/pretrain_vlm.py (msrun for several workers).
# Extra flags given to this script are appended (the last occurrence of a flag wins).
python -m ms_mm.training.launch $DISTRIBUTED_ARGS -- $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" 2>&1 | tee logs/train_${logfile}.log
exit ${PIPESTATUS[0]}
