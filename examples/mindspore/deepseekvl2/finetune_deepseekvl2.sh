#!/bin/bash
# DeepSeek-VL2 finetune on ms-mm (MindSpeed-MM script layout; msrun instead of torchrun).
# Run from the repository root:  bash examples/mindspore/deepseekvl2/finetune_deepseekvl2.sh
# Without the weights below it runs the embedded default (tiny DeepSeek-VL2 + demo data, see README.md);
# DRY_RUN=1 checks the parallel plan for this card count without devices.
# DeepSeek-VL2 at its real size (27.5 B) does not fit one node of 64 GB cards (parameters, gradients
# and AdamW states alone: 71.4 GB per card at EP 8). On the guide's 4 nodes (NNODES=4, NODE_RANK per
# node, MASTER_ADDR of node 0) DRY_RUN predicts 60 GB per card with these flags appended:
#   --moe-expert-capacity-factor 1.0 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
# MM_DATA / MM_MODEL may be set in the environment (the wrappers under examples/deepseekvl2/ pass
# their own data.json); the MLA and MoE sizes live in model.json's text_decoder.
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
export ACLNN_CACHE_LIMIT=100000

NPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=6000
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="${MM_DATA:-${SCRIPT_DIR}/data.json}"
MM_MODEL="${MM_MODEL:-${SCRIPT_DIR}/model.json}"
LOAD_PATH="ckpt/DeepSeekVL2"
SAVE_PATH="save_dir"
LOG_PATH="msrun_log"

MBS=1
GRAD_ACC_STEP=64
TP=1
PP=1
CP=1
EP=8
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

DISTRIBUTED_ARGS="
    --local_worker_num $NPUS_PER_NODE \
    --worker_num $WORLD_SIZE \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT \
    --log_dir $LOG_PATH \
    --join True
"

# model hyper-parameters (MLA sizes, experts, routing, freeze switches) live in model.json
GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --expert-model-parallel-size ${EP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --seq-length 4096 \
    --tokenizer-type NullTokenizer \
    --vocab-size 129280 \
    --swiglu \
    --no-masked-softmax-fusion \
    --lr 4e-5 \
    --min-lr 0.0 \
    --train-iters 5000 \
    --lr-decay-style cosine \
    --weight-decay 0.05 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --no-gradient-accumulation-fusion \
    --use-distributed-optimizer \
    --bf16 \
    --load $LOAD_PATH \
    --variable-seq-lengths \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 4
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 5000 \
    --save $SAVE_PATH \
    --log-tps
"

logfile=train_$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
# ms_mm.training.launch checks the weights (embedded default when absent), the parallel sizes against
# the model (EP must divide the 72 routed experts), honours DRY_RUN=1, then starts
# ms_mm/training/pretrain_vlm.py through msrun (directly for a single worker).
# Extra flags given to this script are appended (the last occurrence of a flag wins).
python -m ms_mm.training.launch $DISTRIBUTED_ARGS -- $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" 2>&1 | tee logs/${logfile}.log
exit ${PIPESTATUS[0]}
