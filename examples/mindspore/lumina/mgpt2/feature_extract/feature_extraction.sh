#!/bin/bash
# Lumina-mGPT 2.0 feature extraction on ms-mm (MindSpeed-MM script layout): every image of the
# dataset through MoVQGAN, every prompt through the text tokenizer, into sorafeature.save_path of
# the tools json (files/*.npz + data.jsonl). Run from the repository root:
#     bash examples/mindspore/lumina/mgpt2/feature_extract/feature_extraction.sh
# One worker per device (NPUS_PER_NODE; on CPU one process per shard). Interrupted runs resume:
# run it again. Without the weights the jsons name it runs the embedded default (tiny MoVQGAN +
# bundled tokenizer on the bundled demo images). Extra flags are passed on (--skip-bad-samples).
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(cd "${SCRIPT_DIR}/../../../../.." && pwd)${PYTHONPATH:+:${PYTHONPATH}}"

# Ascend toolkit environment, when installed (modify the path to your CANN install)
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then source /usr/local/Ascend/ascend-toolkit/set_env.sh; fi
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export TASK_QUEUE_ENABLE=1
export COMBINED_ENABLE=1
export CPU_AFFINITY_CONF=1
export HCCL_CONNECT_TIMEOUT=1200
export GLOG_v=${GLOG_v:-3}

NPUS_PER_NODE=${NPUS_PER_NODE:-1}
MASTER_ADDR=localhost
MASTER_PORT=6000
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

TP=1
PP=1
CP=1
MBS=1
GBS=$(($WORLD_SIZE*$MBS/$CP))

MM_DATA="${MM_DATA:-${SCRIPT_DIR}/data.json}"
MM_MODEL="${MM_MODEL:-${SCRIPT_DIR}/model.json}"
MM_TOOL="${MM_TOOL:-${SCRIPT_DIR}/tools.json}"

# accepted for the guide's script shape; feature extraction has no parallel sizes
GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-workers 0 \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL
"

logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
python -m ms_mm.models.lumina_mgpt2.features --workers $WORLD_SIZE $GPT_ARGS $MM_ARGS "$@" 2>&1 | tee logs/feature_${logfile}.log
exit ${PIPESTATUS[0]}
