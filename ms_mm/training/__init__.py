"""ms_mm/training: the model-agnostic training engine (families come from `ms_mm.registry`).

| module | owns |
|---|---|
| `arguments.py` | Megatron / MindSpeed-MM flags -> `TrainArgs`, their validation |
| `weights.py` | `load_state_dict`: an MM-named state dict into a Cell, names and shapes checked |
| `ema.py` | the EMA of the weights (saved as `ema/` beside the model) |
| `optimizer.py` | warm-up + cosine/linear/constant LR; `FusedAdamW` (one kernel per parameter, = torch AdamW), mindformers' AdamW on Ascend |
| `train_step.py` | graph-mode step, one static-shape graph per input shape (bucket): grads, accumulation, DP reduction, loss scaling, bucketed grad norm, clipping |
| `checkpointing.py` | training checkpoints (weights + optimizer, RNG, data, step state), resume |
| `mm_checkpoint.py` | the MM checkpoint directory format and atomic commits |
| `metrics.py` | Megatron-style log lines, progress bar, TensorBoard |
| `trainer.py`, `pretrain_vlm.py` | the training loop and its entry script (what msrun launches) |
| `launch.py` | what the example scripts call: weights check, embedded default, DRY_RUN, msrun |
"""
