#!/bin/bash
# The path the DeepSeek-VL2 guide's launch section names: runs
# examples/mindspore/deepseekvl2/finetune_deepseekvl2.sh (its data.json / model.json).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "${HERE}/../../mindspore/deepseekvl2/finetune_deepseekvl2.sh" "$@"
