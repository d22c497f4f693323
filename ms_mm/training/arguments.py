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
    "--distributed-timeout-minutes": (1, "msrun manages the collective timeouts"),
    "--distributed-backend": (1, "MindSpore picks HCCL / the CPU backend itself"),
    "--ai-framework": (1, "ms-mm always runs on MindSpore"),
    "--swap-attention": (0, "activation swapping is not implemented"),
    "--mm-tool": (1, "no tool json is needed"),
    "--eval-interval": (1, "evaluation during training is not implemented"),
    "--eval-iters": (1, "evaluation during training is not implemented"),
    "--ckpt-format": (1, "checkpoints are always safetensors"),
    "--context-parallel-algo": (1, "context parallel is not implemented (size must be 1)"),
    "--lr-warmup-init": (1, "warm-up always starts from 0"),
    "--virtual-pipeline-model-parallel-size": (1, "interleaved (virtual) pipeline stages are not implemented"),
    "--sequence-parallel": (0, "sequence parallel follows the sharding plan"),
    "--use-cpu-initialization": (0, "parameters are initialised on the host anyway"),
    "--bf16-reduce": (0, "gradient reduction follows the parameter dtype"),
    "--no-bias-swiglu-fusion": (0, "no fusion exists here"),
    "--no-rope-fusion": (0, "ms_mm.ops chooses fused kernels by device"),
    "--reuse-fp32-param": (0, "parameters are kept in fp32"),
    # MindSpeed-MM's DeepSeek-VL2 script: MoE kernels and MLA switches (sizes live in model.json)
    "--moe-grouped-gemm": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--moe-permutation-async-comm": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--moe-token-dispatcher-type": (1, "ms_mm.ops chooses the MoE token dispatch by device and capacity"),
    "--moe-pad-expert-input-to-capacity": (0, "with a capacity factor the expert input is always padded to it"),
    "--use-fused-moe-token-permute-and-unpermute": (0, "ms_mm.ops chooses the MoE kernels by device"),
    "--multi-head-latent-attention": (0, "comes from model.json (text_decoder.multi_head_latent_attention)"),
    "--qk-layernorm": (0, "MLA's q/kv norms come with model.json's multi_head_latent_attention"),
    "--position-embedding-type": (1, "comes from model.json"),
    "--trust-remote-code": (0, "ms-mm never runs checkpoint code (see mm-convert --cfg.trust_remote_code)"),
    # MindSpeed-MM's FSDP2 scripts (the memory switch itself is --use-torch-fsdp2, see TrainArgs.validate)
    "--untie-embeddings-and-output-weights": (0, "tying comes from model.json"),
    "--fsdp2-config-path": (1, "no FSDP2 config is read (see --use-torch-fsdp2)"),
    "--optimizer-selection": (1, "AdamW is mindformers' (fused on Ascend)"),
    # the upstream torchrun recipes (train/pretrain_*.py)
    "--num_shard": (1, "sharding follows the card count"),
    "--dataset_config_file": (1, "the data json names its YAML (basic_parameters.dataset_config_file)"),
    "--model_path": (1, "the model comes from --load and the model json"),
    "--layer_module": (1, "comes from model.json"),
}

# The upstream torchrun recipes' spellings of Megatron flags: alias -> TrainArgs field
RECIPE_ALIASES = {
    "--total_steps": "train_iters", "--warmup_steps": "lr_warmup_iters", "--save_every": "save_interval",
    "--log_every": "log_interval", "--num_worker": "num_workers", "--results_dir": "tensorboard_dir",
    "--checkpoint_dir": "save",
}


def str2bool(value) -> bool:
    """`True` / `False` (also 1/0, yes/no), as the recipes pass booleans."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


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
    # EMA and the recipes' resume switches
    ema: Optional[float] = None
    auto_resume: bool = True
    resume_model_only: bool = False
    finetune_from_ema: bool = False
    finetune_from_hf: bool = False
    use_torch_fsdp2: bool = False
    # memory: MindSpore's optimizer parallel and Cell.recompute (ms_mm.parallel.training)
    use_distributed_optimizer: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # a model family's own flags (`Family.extra_flags`), parsed once the model json names the family
    family_argv: List[str] = field(default_factory=list)
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
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ArgumentError(f"--ema must be in [0, 1) (0 disables the weights' EMA), got {self.ema}")
        if self.use_torch_fsdp2 and (device_target.upper() != "ASCEND" or world_size < 2):
            raise ArgumentError(
                f"--use-torch-fsdp2 shards parameters and optimizer state across cards (MindSpore's optimizer "
                f"parallel); it needs Ascend with more than one card, here {device_target} x {world_size}: remove it")
        if self.use_torch_fsdp2:        # FSDP2's sharding of weights + optimizer state = MindSpore's optimizer parallel
            self.use_distributed_optimizer = True
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
    g = p.add_argument_group("EMA and resume (the upstream recipes' switches)")
    g.add_argument("--ema", type=float, default=None,
                   help="decay of the weights' EMA, saved as ema/ in each checkpoint (default: the family's; 0: off)")
    for flag in ("--auto_resume", "--auto-resume"):
        g.add_argument(flag, dest="auto_resume", type=str2bool, nargs="?", const=True, default=True,
                       help="resume from the latest checkpoint in --save / --checkpoint_dir when there is one "
                            "(the default; --auto_resume False or --no-auto-resume starts over)")
    g.add_argument("--no-auto-resume", dest="auto_resume", action="store_false",
                   help="start over even when --save already holds a checkpoint of this model")
    for flag in ("--resume-model-only", "--resume_model_only"):
        g.add_argument(flag, dest="resume_model_only", type=str2bool, nargs="?", const=True, default=False,
                       help="--load gives model weights only (iteration 0, fresh optimizer and data)")
    for flag in ("--finetune-from-ema", "--finetune_from_ema"):
        g.add_argument(flag, dest="finetune_from_ema", type=str2bool, nargs="?", const=True, default=False,
                       help="with --resume-model-only: start from the checkpoint's EMA weights")
    for flag in ("--finetune_from_hf", "--finetune-from-hf"):
        g.add_argument(flag, dest="finetune_from_hf", type=str2bool, nargs="?", const=True, default=False,
                       help="--load is a converted HF release (weights only)")
    g = p.add_argument_group("memory (optimizer parallel, recomputation)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer states over data-parallel ranks (MindSpore's optimizer parallel)")
    g.add_argument("--recompute-granularity", default=None,
                   help="recompute activations in the backward pass (Cell.recompute of the model's layers)")
    g.add_argument("--recompute-method", default=None, help="uniform | block")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="MindSpeed-MM's memory switch: optimizer parallel on Ascend (refused elsewhere)")
    g = p.add_argument_group("the upstream recipes' spellings")
    for flag, dest in RECIPE_ALIASES.items():
        kind = str if dest in ("tensorboard_dir", "save") else int
        g.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"= --{dest.replace('_', '-')}")
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
    family_argv, unknown = _family_flags(unknown)
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
    args.family_argv = family_argv
    return args


def _known_family_flags() -> set:
    from ms_mm import registry

    return {flag for f in registry.families() for flag in f.extra_flags}


def _family_flags(tokens: Sequence[str]):
    """(tokens of model families' own flags, the rest): a family flag takes the next token as its value
    unless that is a flag itself."""
    if not tokens:
        return [], []
    known = _known_family_flags()
    mine, rest, i = [], [], 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if tok.split("=", 1)[0] in known:
            mine.append(tok)
            if "=" not in tok and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                mine.append(tokens[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    return mine, rest


def parse_family_flags(family, tokens: Sequence[str]) -> dict:
    """{dest: value} of a family's own flags (`Family.extra_flags`); a flag of another family is an error."""
    flags = dict(getattr(family, "extra_flags", {}) or {})
    out, i, tokens = {}, 0, list(tokens)
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        if name not in flags:
            raise ArgumentError(f"{name} is not a flag of model family {family.name} (its own flags: "
                                f"{' '.join(flags) or 'none'})")
        kind, _ = flags[name]
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "True"
        try:
            out[name.lstrip("-").replace("-", "_")] = kind(value)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ArgumentError(f"{name} {value}: {e}") from None
        i += 1
    return out
