"""Training entry script for multimodal models (what msrun launches, as in MindSpeed-MM).

    msrun --worker_num 1 --local_worker_num 1 --master_port 6000 --join True \\
        ms_mm/training/pretrain_vlm.py --mm-model model.json --mm-data data.json --micro-batch-size 1 ...

also runnable as `python -m ms_mm.training.pretrain_vlm ...`. All logic is in `ms_mm.training.trainer`.
"""
import os
import sys

if __package__ in (None, ""):
    # launched by path (msrun / python path/to/pretrain_vlm.py): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ms_mm.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
