"""ms_mm/training: the model-agnostic training engine.

| module | owns |
|---|---|
| `arguments.py` | Megatron / MindSpeed-MM flags -> `TrainArgs`, their validation |
| `registry.py`, `families.py`, `toy.py` | model families by model.json `model_id` (Qwen2.5-VL, DeepSeek-VL2, a toy) |
| `optimizer.py` | warm-up + cosine/linear/constant LR, AdamW (mindformers) |
| `train_step.py` | graph-mode step: grads, accumulation, DP reduction, loss scaling, clipping |
| `checkpointing.py` | training checkpoints (weights + optimizer, RNG, data, step state), resume |
| `mm_checkpoint.py` | the MM checkpoint directory format and atomic commits |
| `metrics.py` | Megatron-style log lines, progress bar, TensorBoard |
| `trainer.py`, `pretrain_vlm.py` | the training loop and its entry script (what msrun launches) |
| `launch.py` | what the example scripts call: weights check, embedded default, DRY_RUN, msrun |
"""
