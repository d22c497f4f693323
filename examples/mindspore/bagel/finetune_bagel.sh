#!/bin/bash
# BAGEL-7B-MoT finetune on ms-mm (MindSpeed-MM script layout; msrun instead of torchrun).
# Run from the repository root:  bash examples/mindspore/bagel/finetune_bagel.sh
# Without the weights below it runs the embedded default (tiny BAGEL in the release layout + demo data of
# all three kinds: text-to-image, editing, understanding; see docs/bagel.md).
# The upstream recipe's flags (train/pretrain_unified_navit.py) are accepted too and appended with "$@":
#   bash examples/mindspore/bagel/finetune_bagel.sh --total_steps 10000 --save_every 1000 --auto_resume True
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "${SCRIPT_DIR}/../../.." && pwd)${PYTHONPATH:+:${PYTHONPATH}}"

# Ascend toolkit environment, when installed (modify the path to your CANN install)
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then source /usr/local/Ascend/ascend-toolkit/set_env.sh; fi
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export TASK_QUEUE_ENABLE=2
export COMBINED_ENABLE=1
export CPU_AFFINITY_CONF=1
export HCCL_CONNECT_TIMEOUT=1200
export NPU_ASD_ENABLE=0
export ASCEND_LAUNCH_BLOCKING=0
export ACLNN_CACHE_LIMIT=100000

NPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=6000
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

TP=1
PP=1
CP=1
MBS=1
GRAD_ACC_STEP=1
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

MM_DATA="${MM_DATA:-${SCRIPT_DIR}/data.json}"
MM_MODEL="${MM_MODEL:-${SCRIPT_DIR}/model.json}"
LOAD_PATH="ckpt/mm_path/BAGEL-7B-MoT"
SAVE_PATH="save_dir"
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

# one micro batch = one packed sequence (data.json packed_parameters); model sizes live in model.json
GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --no-gradient-accumulation-fusion \
    --tokenizer-type NullTokenizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --vocab-size 152064 \
    --clip-grad 0.1 \
    --seq-length 1024 \
    --lr 2e-5 \
    --min-lr 1e-7 \
    --lr-warmup-init 0 \
    --lr-warmup-iters 0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --adam-eps 1e-15 \
    --lr-decay-style constant \
    --weight-decay 0 \
    --train-iters 50000 \
    --num-workers 1 \
    --bf16 \
    --use-cpu-initialization \
    --load $LOAD_PATH \
    --finetune_from_hf True \
    --resume-model-only True \
    --finetune-from-ema True \
    --ema 0.9999
"
# --use-torch-fsdp2 (MindSpeed-MM's memory switch; append it): weights, gradients, optimizer states and the
# EMA sharded over the cards (ZeRO-3), one packed sequence per card (docs/bagel.md; what fits: README.md).

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --save $SAVE_PATH \
    --tensorboard-dir $SAVE_PATH/tensorboard \
    --log-tps
"

logfile=train_$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
# ms_mm.training.launch checks the weights (embedded default when absent), honours DRY_RUN=1, then starts
# ms_mm/training/pretrain_vlm.py through msrun (directly for a single worker).
python -m ms_mm.training.launch $DISTRIBUTED_ARGS -- $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" 2>&1 | tee logs/${logfile}.log
exit ${PIPESTATUS[0]}
