#!/bin/bash
# Qwen2.5-VL-72B finetune on ms-mm (MindSpeed-MM script layout; msrun instead of torchrun).
# Run from the repository root:  bash examples/mindspore/qwen2.5vl/finetune_qwen2_5_vl_72b.sh
# Without the weights below it runs the embedded default (tiny model + demo data, see README.md);
# DRY_RUN=1 checks the parallel plan for this card count without devices.
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "${SCRIPT_DIR}/../../.." && pwd)${PYTHONPATH:+:${PYTHONPATH}}"

# Ascend toolkit environment, when installed (modify the path to your CANN install)
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then source /usr/local/Ascend/ascend-toolkit/set_env.sh; fi
if [ -f /usr/local/Ascend/nnal/atb/set_env.sh ]; then source /usr/local/Ascend/nnal/atb/set_env.sh --cxx_abi=0; fi
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export HCCL_CONNECT_TIMEOUT=1200

NPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=6000
NNODES=4
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="${SCRIPT_DIR}/data_72b.json"
MM_MODEL="${SCRIPT_DIR}/model_72b.json"
LOAD_PATH="ckpt/mm_path/Qwen2.5-VL-72B-Instruct"
SAVE_PATH="save_dir"
LOG_PATH="msrun_log"

TP=4
PP=8
CP=1
MBS=1
GRAD_ACC_STEP=96
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

# model hyper-parameters live in model_72b.json (freeze switches included); training ones here
# TP 4 (MindSpeed-MM's script: TP 2) and full activation recompute (the three --recompute-* flags): at
# TP 2 x PP 8 on these 32 cards a middle stage holds 4.8 B parameters per card, whose weights, gradients
# and AdamW states take 53.9 GB even in Megatron's accounting (more in MindSpore's, with fp32 weights and
# gradient accumulators); at TP 4 with recompute DryRun predicts 56.4 GB there (docs/parallel.md).
# Convert the checkpoint with --cfg.parallel_config.tp_size 4.
GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size 152064 \
    --seq-length 1024 \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --lr 1.0e-5 \
    --min-lr 0.0 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters 10000 \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --use-flash-attn \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --recompute-granularity full \
    --recompute-method uniform \
    --recompute-num-layers 1 \
    --num-workers 8
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --save $SAVE_PATH \
    --log-tps
"

logfile=train_$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
# ms_mm.training.launch checks the weights (embedded default when absent), honours DRY_RUN=1,
# then starts ms_mm/training/pretrain_vlm.py through msrun (directly for a single worker).
# Extra flags given to this script are appended (the last occurrence of a flag wins).
python -m ms_mm.training.launch $DISTRIBUTED_ARGS -- $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" 2>&1 | tee logs/${logfile}.log
exit ${PIPESTATUS[0]}
