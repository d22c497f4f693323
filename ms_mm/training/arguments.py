"""Command-line arguments of the training entry point, in Megatron / MindSpeed-MM spelling.

The example scripts pass the flags of MindSpeed-MM's `finetune_qwen2_5_vl_*.sh` unchanged. Each
flag is in one of three groups:

* **used**: parsed into `TrainArgs` and acted on (batch sizes, LR schedule, AdamW, clipping,
  precision, checkpoint paths and the four `--no-load-* / --no-save-*` switches, logging ...);
* **accepted**: Megatron flags that have no effect here (kernel fusions that `ms_mm.ops` picks by
  itself, Megatron tokenizer settings that model.json already fixes, torch checkpoint formats ...).
  They are parsed so the upstream scripts run as written, and `TrainArgs.ignored_flags` lists the
  ones given so the trainer can say so once in its log;
* anything else is an error that names the flag.

`validate()` checks the combinations (world size vs. tp*pp*cp*ep, global batch vs. micro batch *
dp, bf16 on CPU ...) and raises `ArgumentError` with the sizes involved.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flag(s) and the values."""


# Megatron / MindSpeed-MM flags that are accepted and have no effect in ms-mm: name -> (nargs, why)
# nargs 0 = a switch, 1 = takes one value.
ACCEPTED_FLAGS = {
    "--use-mcore-models": (0, "ms-mm models are always the Megatron-core layout"),
    "--tokenizer-type": (1, "the tokenizer comes from the data json"),
    "--tokenizer-model": (1, "the tokenizer comes from the data json"),
    "--vocab-size": (1, "the vocabulary size comes from model.json"),
    "--seq-length": (1, "sequence lengths come from the data pipeline"),
    "--max-position-embeddings": (1, "comes from model.json"),
    "--make-vocab-size-divisible-by": (1, "the vocabulary size comes from model.json"),
    "--normalization": (1, "comes from model.json"),
    "--use-fused-rmsnorm": (0, "ms_mm.ops chooses fused kernels by device"),
    "--swiglu": (0, "comes from model.json"),
    "--use-fused-swiglu": (0, "ms_mm.ops chooses fused kernels by device"),
    "--use-flash-attn": (0, "ms_mm.ops chooses flash attention by device"),
    "--use-fused-rotary-pos-emb": (0, "ms_mm.ops chooses fused kernels by device"),
    "--no-masked-softmax-fusion": (0, "no masked-softmax fusion exists here"),
    "--no-gradient-accumulation-fusion": (0, "gradient accumulation is always unfused"),
    "--variable-seq-lengths": (0, "sequence lengths always vary per batch"),
    "--use-distributed-optimizer": (0, "the optimizer state is replicated under data parallel"),
    "--distributed-timeout-minutes": (1, "msrun manages the collective timeouts"),
    "--distributed-backend": (1, "MindSpore picks HCCL / the CPU backend itself"),
    "--ai-framework": (1, "ms-mm always runs on MindSpore"),
    "--swap-attention": (0, "activation swapping is not implemented"),
    "--mm-tool": (1, "no tool json is needed"),
    "--eval-interval": (1, "evaluation during training is not implemented"),
    "--eval-iters": (1, "evaluation during training is not implemented"),
    "--ckpt-format": (1, "checkpoints are always safetensors"),
    "--context-parallel-algo": (1, "context parallel is not implemented (size must be 1)"),
    "--sequence-parallel": (0, "sequence parallel follows the sharding plan"),
    "--use-cpu-initialization": (0, "parameters are initialised on the host anyway"),
    "--bf16-reduce": (0, "gradient reduction follows the parameter dtype"),
    "--no-bias-swiglu-fusion": (0, "no fusion exists here"),
    "--no-rope-fusion": (0, "ms_mm.ops chooses fused kernels by device"),
    "--reuse-fp32-param": (0, "parameters are kept in fp32"),
    "--recompute-granularity": (1, "recomputation is not configured from the command line"),
    "--recompute-method": (1, "recomputation is not configured from the command line"),
    "--recompute-num-layers": (1, "recomputation is not configured from the command line"),
    # MindSpeed-MM's DeepSeek-VL2 script: MoE kernels and MLA switches (sizes live in model.json)
    "--moe-grouped-gemm": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--moe-permutation-async-comm": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--moe-token-dispatcher-type": (1, "ms_mm.ops chooses the MoE token dispatch by device"),
    "--use-fused-moe-token-permute-and-unpermute": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--multi-head-latent-attention": (0, "comes from model.json (text_decoder.multi_head_latent_attention)"),
    "--qk-layernorm": (0, "MLA's q/kv norms come with model.json's multi_head_latent_attention"),
    "--position-embedding-type": (1, "comes from model.json"),
    "--trust-remote-code": (0, "ms-mm never runs checkpoint code (see mm-convert --cfg.trust_remote_code)"),
}


@dataclass
class TrainArgs:
    # batch and schedule
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    train_iters: int = 10
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 1234
    # precision
    fp16: bool = False
    bf16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 16
    loss_scale_window: int = 1000
    # parallel sizes
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # checkpoints
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    finetune: bool = False
    exit_interval: Optional[int] = None
    # data / model
    mm_data: Optional[str] = None
    mm_model: Optional[str] = None
    num_workers: int = 0
    skip_bad_samples: bool = False
    # logging
    log_interval: int = 1
    log_tps: bool = False
    tensorboard_dir: Optional[str] = None
    log_throughput: bool = False
    # filled in by parse_args / the launcher
    ignored_flags: List[str] = field(default_factory=list)
    world_size: int = 1

    # --- derived sizes ----------------------------------------------------------------------
    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size * self.expert_model_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                                   * self.context_parallel_size)

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * (self.lr_decay_iters or self.train_iters))
        return self.lr_warmup_iters

    def validate(self, world_size: int, device_target: str) -> "TrainArgs":
        """Check flag combinations for a run on `world_size` processes on `device_target`."""
        self.world_size = world_size
        for name in ("micro_batch_size", "train_iters", "log_interval", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size"):
            value = getattr(self, name)
            if value < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        tp, pp, cp, ep = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                          self.context_parallel_size, self.expert_model_parallel_size)
        if world_size % (tp * pp * cp):
            raise ArgumentError(
                f"WORLD_SIZE={world_size} is not divisible by tensor-model-parallel-size ({tp}) * "
                f"pipeline-model-parallel-size ({pp}) * context-parallel-size ({cp}) = {tp * pp * cp}")
        dp = world_size // (tp * pp * cp)
        if ep > 1 and dp % ep:
            raise ArgumentError(f"expert-model-parallel-size ({ep}) must divide the data-parallel size "
                                f"{dp} (= WORLD_SIZE {world_size} / (tp {tp} * pp {pp} * cp {cp}))")
        if cp > 1:
            raise ArgumentError(f"--context-parallel-size {cp}: context parallel is not implemented in "
                                f"ms-mm yet; use 1")
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * dp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ArgumentError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} * data-parallel size {dp} (WORLD_SIZE {world_size} / (tp {tp} * "
                f"pp {pp} * cp {cp}))")
        if self.fp16 and self.bf16:
            raise ArgumentError("--fp16 and --bf16 are mutually exclusive")
        if self.bf16 and device_target.upper() == "CPU":
            raise ArgumentError(
                "--bf16 needs an Ascend device: MindSpore has no bf16 CPU kernels for matmul/softmax/"
                "reshape. Remove --bf16 (fp32) or use --fp16 to train on CPU")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ArgumentError(f"--lr-decay-style {self.lr_decay_style!r}: choose cosine, linear or constant")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ArgumentError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if self.min_lr > self.lr:
            raise ArgumentError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.clip_grad < 0:
            raise ArgumentError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ArgumentError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.save_interval is not None and not self.save:
            raise ArgumentError("--save-interval is set but --save (the checkpoint directory) is not")
        if not self.mm_model:
            raise ArgumentError("--mm-model (the model json) is required")
        if not self.mm_data:
            raise ArgumentError("--mm-data (the data json) is required")
        return self


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_vlm.py", allow_abbrev=False,
        description="ms-mm training entry point (Megatron / MindSpeed-MM flags; launch it with msrun)")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch * data-parallel size (no gradient accumulation)")
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clip; 0 disables it")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", help="fp16 compute with dynamic loss scaling")
    g.add_argument("--bf16", action="store_true", help="bf16 compute (Ascend only)")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale (fp16)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g = p.add_argument_group("parallel sizes")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, help="converter output (release) or a training save dir")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only and start from iteration 0")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) once the iteration is a multiple of this")
    g = p.add_argument_group("data and model")
    g.add_argument("--mm-data", default=None, help="data json (data_*.json)")
    g.add_argument("--mm-model", default=None, help="model json (model_*.json)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="skip unreadable / malformed samples (counted in the log) instead of failing")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-tps", action="store_true", help="log tokens per sample and tokens per second")
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--tensorboard-dir", default=None)
    g = p.add_argument_group("accepted for MindSpeed-MM compatibility (no effect)")
    for flag, (nargs, why) in ACCEPTED_FLAGS.items():
        if nargs == 0:
            g.add_argument(flag, action="store_true", dest="_ignored_" + flag[2:].replace("-", "_"), help=why)
        else:
            g.add_argument(flag, default=None, dest="_ignored_" + flag[2:].replace("-", "_"), help=why)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    """Parse argv into TrainArgs; an unknown flag raises ArgumentError naming it."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ArgumentError(f"unknown argument(s): {' '.join(flags)} (see `python -m "
                            f"ms_mm.training.pretrain_vlm --help` for the flags ms-mm accepts)")
    values = vars(ns)
    ignored = []
    for flag in ACCEPTED_FLAGS:
        v = values.pop("_ignored_" + flag[2:].replace("-", "_"))
        if v not in (None, False):
            ignored.append(flag)
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    args = TrainArgs(**{k: v for k, v in values.items() if k in known})
    args.ignored_flags = ignored
    return args
