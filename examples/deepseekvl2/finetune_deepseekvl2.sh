#!/bin/bash
# The DeepSeek-VL2 guide's path: runs examples/mindspore/deepseekvl2/finetune_deepseekvl2.sh with
# this directory's data.json (edit data_path / data_folder / processor_path here, as the guide says).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MM_DATA="${MM_DATA:-${HERE}/data.json}" exec bash "${HERE}/../mindspore/deepseekvl2/finetune_deepseekvl2.sh" "$@"
