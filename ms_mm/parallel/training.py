"""The trainer's parallel path: sizes checked up front, the plan applied, and the sharded train step.

    pc = run_parallel_config(args, world_size, model_json)      # ParallelConfigError: one line
    check_run(pc, config, args)                                 # plan.check + batch arithmetic
    set_parallel_context(pc, optimizer_parallel=args.use_distributed_optimizer)
    parallelize(model, pc); apply_recompute(model, ...)
    step = ParallelTrainStep(model, optimizer, pc, micro_batches=..., clip_grad=..., loss_scaler=...)
    loss, grad_norm, finite = step(micro_batches)              # same call as training.TrainStep

``ms_mm.training.trainer`` takes this path when tp / pp / ep > 1 or ``--use-distributed-optimizer``
is given on more than one rank, under MindSpore semi-auto parallel (Ascend, or DryRun's simulated
Ascend ranks; the CPU backend refuses it). Each data-parallel rank is fed its own samples
(``sample_axes`` given: ``full_batch=False`` with a dataset strategy splitting each input's sample axis
over dp; the model-parallel peers of a dp rank are fed the same ones); without ``sample_axes`` every rank
is fed the whole global micro batches (``full_batch=True``) and the plan's strategies cut the rows by
dp. Either way the plan's strategies describe the global batch. The ``GBS / (MBS x DP)`` micro
batches of a step are stacked on a leading axis and run in one graph: under pipeline parallel by
``StackedPipelineCell`` (MindSpore's pipeline schedule; the micro batches share one ``@lazy_inline`` loss
subgraph), otherwise by a loop over them tagged for MindSpore's gradient-accumulation pass. The step then
unscales the loss scale (fp16), takes the global gradient norm, clips and updates, as ``training.TrainStep``
does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ms_mm.parallel.config import ParallelConfig, ParallelConfigError


# ------------------------------------------------------------------------------------ sizes
def pipeline_layers_from_json(model_json: dict):
    """(llm_pp_layers, vit_pp_layers) a MindSpeed-MM model json declares (``pipeline_num_layers``)."""
    llm = (model_json.get("text_decoder") or {}).get("pipeline_num_layers")
    vit = ((model_json.get("image_encoder") or {}).get("vision_encoder") or {}).get("pipeline_num_layers")
    return llm, vit


def run_parallel_config(args, world_size: int, model_json: Optional[dict] = None) -> ParallelConfig:
    """The ParallelConfig of a training run from its Megatron flags and the launched world size."""
    llm, vit = pipeline_layers_from_json(model_json or {})
    pp = args.pipeline_model_parallel_size
    return ParallelConfig(world_size=world_size, tp=args.tensor_model_parallel_size, pp=pp,
                          cp=args.context_parallel_size, ep=args.expert_model_parallel_size,
                          llm_pp_layers=llm if pp > 1 else None, vit_pp_layers=vit if pp > 1 else None)


def micro_batches_per_step(pc: ParallelConfig, args) -> int:
    """GBS / (MBS x DP), checked to divide and (pipeline) to give every stage a micro batch."""
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    if gbs is None:
        return 1
    if gbs % (mbs * pc.dp):
        raise ParallelConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} * dp {pc.dp} "
            f"(world_size {pc.world_size} / (tp {pc.tp} * pp {pc.pp} * cp {pc.cp}))")
    micro = gbs // (mbs * pc.dp)
    if pc.pp > 1 and micro < pc.pp:
        raise ParallelConfigError(
            f"--global-batch-size {gbs} gives {micro} micro batch(es) of {mbs} x dp {pc.dp} per step, fewer "
            f"than pp={pc.pp} pipeline stages: raise --global-batch-size to at least {mbs * pc.dp * pc.pp}")
    return micro


def check_run(pc: ParallelConfig, model_config, args, seq_len: int = 0) -> int:
    """Every size check of a parallel run before anything starts; returns the micro batches per step."""
    from ms_mm.parallel.plans import plan_for_config

    plan = plan_for_config(model_config)
    plan.check(pc, model_config)
    micro = micro_batches_per_step(pc, args)
    plan.check_batch(pc, args.micro_batch_size * pc.dp, seq_len or 0)
    return micro


def uses_parallel_path(args, world_size: int) -> bool:
    """tp / pp / ep > 1, or the distributed optimizer on more than one rank."""
    return (args.model_parallel_size > 1
            or (bool(getattr(args, "use_distributed_optimizer", False)) and world_size > 1))


# -------------------------------------------------------------------------------- recompute
def layer_lists(model):
    """(name, CellList) of every ``*.layers`` CellList of ``model`` (transformer blocks)."""
    from mindspore import nn

    return [(name, cell) for name, cell in model.cells_and_names()
            if isinstance(cell, nn.CellList) and name.rsplit(".", 1)[-1] == "layers"]


def apply_recompute(model, granularity: Optional[str], method: Optional[str] = None,
                    num_layers: Optional[int] = None) -> list:
    """Megatron's recompute flags as ``Cell.recompute()``; returns the names of recomputed Cells.

    ``full`` + ``uniform`` (or no method): every layer of every ``*.layers`` list is recomputed
    (Megatron checkpoints groups of ``num_layers`` layers; per-layer recompute keeps the same
    activations); ``full`` + ``block``: the first ``num_layers`` layers of each list; ``selective``:
    each layer's ``core_attention``.
    """
    if not granularity:
        if method or num_layers:
            raise ParallelConfigError("--recompute-method / --recompute-num-layers need --recompute-granularity")
        return []
    if granularity not in ("full", "selective"):
        raise ParallelConfigError(f"--recompute-granularity {granularity!r}: choose full or selective")
    if method not in (None, "uniform", "block"):
        raise ParallelConfigError(f"--recompute-method {method!r}: choose uniform or block")
    if granularity == "full" and method == "block" and not num_layers:
        raise ParallelConfigError("--recompute-method block needs --recompute-num-layers N (layers recomputed)")
    lists = layer_lists(model)
    if not lists:
        raise ParallelConfigError(f"--recompute-granularity {granularity}: the model exposes no `*.layers` "
                                  f"list of blocks to recompute")
    done = []
    for name, layers in lists:
        chosen = list(layers)
        if granularity == "full" and method == "block":
            chosen = chosen[:num_layers]
        for i, layer in enumerate(chosen):
            if granularity == "selective":
                attn = getattr(getattr(layer, "self_attention", None), "core_attention", None)
                if attn is None:
                    continue
                attn.recompute()
                done.append(f"{name}.{i}.self_attention.core_attention")
            else:
                layer.recompute()
                done.append(f"{name}.{i}")
    if not done:
        raise ParallelConfigError("--recompute-granularity selective: the model's layers have no "
                                  "self_attention.core_attention to recompute")
    return done


# ------------------------------------------------------------------------------ dry-run data
class SyntheticLoader:
    """DryRun without readable data: the family's synthetic batch (``Family.synthetic_batch``) of
    ``batch_size`` samples of ``seq_len`` tokens (default 1024), every step."""

    def __init__(self, family, config, batch_size: int, seq_len: int = 0):
        if family.synthetic_batch is None:
            raise ValueError(f"the {family.name} family gives no synthetic batch for the dry run")
        self.batch_size, self.seq_len = batch_size, seq_len or 1024
        self.batch = family.synthetic_batch(config, batch_size, self.seq_len)
        self.skipped = 0

    def describe(self) -> str:
        return f"synthetic batches of {self.batch_size} samples x {self.seq_len} tokens"

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# ------------------------------------------------------------------------------- train step
def stack_micro_batches(micro_batches: Sequence[Sequence[np.ndarray]], names: Sequence[str]):
    """[M, ...] arrays from M micro batches; all micro batches of a step must share their shapes."""
    first = [tuple(np.shape(a)) for a in micro_batches[0]]
    for j, mb in enumerate(micro_batches[1:], 1):
        shapes = [tuple(np.shape(a)) for a in mb]
        if shapes != first:
            diff = [f"{n} {list(a)} vs {list(b)}" for n, a, b in zip(names, first, shapes) if a != b]
            raise ValueError(f"micro batch {j} of the step has other shapes than micro batch 0 ({'; '.join(diff)}): "
                             f"the parallel step stacks them; pad every sample to one shape (fixed sequence "
                             f"length and image size)")
    return [np.stack([np.asarray(mb[i]) for mb in micro_batches]) for i in range(len(first))]


def _build_cells():
    import mindspore as ms
    from mindspore import nn, ops

    from mindspore.parallel._utils import _get_enable_parallel_optimizer, _get_parallel_mode

    from ms_mm.parallel.pipeline import StackedPipelineCell, _TakeMicroBatch
    from ms_mm.training.ema import average_into

    class LossOnly(nn.Cell):
        """The model's loss alone (output 0), optionally times the loss scale (fp16)."""

        def __init__(self, model, loss_scaler=None):
            super().__init__(auto_prefix=False)     # keep the MM parameter names
            self.model = model
            self.scaler = loss_scaler

        def construct(self, *inputs):
            loss = self.model(*inputs)[0]
            if self.scaler is not None:
                loss = loss * ops.cast(self.scaler.scale_value, loss.dtype)
            return loss

    class SharedLossOnly(LossOnly):
        """``LossOnly`` compiled once, as a subgraph each pipeline micro batch's call reuses (``@lazy_inline``,
        as mindformers wraps its models), instead of one inlined copy of the stage per micro batch: the 7B's
        stage 1 at 4 micro batches compiles in 77 s instead of 243 s under DryRun, to the same predicted peak.
        Under pp = 1 the loss stays inlined: there the real-size 3B's compile with it (and the
        ``gradient_accumulation_shard`` it requires under optimizer parallel) passed 17.6 GiB of host memory
        at 4 micro batches, where the inlined one compiles. Ascend's graph compiler (DryRun's too) takes it;
        the CPU backend refuses it."""

        @ms.lazy_inline
        def __init__(self, model, loss_scaler=None):
            super().__init__(model, loss_scaler)

    class SumOverMicroBatches(nn.Cell):
        """pp == 1: the network once per stacked micro batch, losses summed: gradient accumulation tagged as
        MindSpore's ``parallel.nn.GradAccumulation`` tags it (``grad_accu_num`` on each micro batch's slice,
        ``forward_end`` on the sums), so that its gradient-accumulation pass runs each micro batch's forward
        and backward before the next one's and accumulates their gradients (in ``accu_grads``, or in the
        gradient shards under optimizer parallel). Untagged, the
        differentiated sum keeps every micro batch's activations until the backward (``tagged=False``:
        under ZeRO-3, where MindSpore 2.9 refuses the pass without ``@lazy_inline``)."""

        def __init__(self, network, micro_size, tagged=True):
            super().__init__(auto_prefix=False)
            self.network = network
            self.micro_size = micro_size
            self.tagged = tagged and micro_size > 1
            tag = micro_size if self.tagged else 0
            self.micro_inputs = nn.CellList([_TakeMicroBatch(i, tag) for i in range(micro_size)])
            self.add_list = [ops.Add().add_prim_attr("forward_end", i) if self.tagged else ops.Add()
                             for i in range(micro_size)]

        def construct(self, *inputs):
            ret = None
            for i in range(self.micro_size):
                out = self.network(*self.micro_inputs[i](*inputs))
                ret = out if ret is None else self.add_list[i](ret, out)
            return ret

    def _square_sum(g):
        return ops.reduce_sum(ops.square(ops.cast(g, ms.float32)))

    def _scale(coef, g):
        return g * ops.cast(coef, g.dtype)

    def _clear(accu_grad, grad):
        accu_grad = ops.depend(accu_grad, grad)
        return ops.assign(accu_grad, accu_grad * 0)

    class ParallelTrainOneStepCell(nn.Cell):
        """forward + backward over the stacked micro batches, (un)scale, global norm, clip, update."""

        def __init__(self, network, optimizer, micro_size, pipeline, clip_grad, loss_scaler, ema_decay=0.0,
                     accumulate=False):
            super().__init__(auto_prefix=False)
            self.network = network
            self.optimizer = optimizer
            self.weights = optimizer.parameters
            self.grad = ops.GradOperation(get_by_list=True)
            self.hyper_map = ops.HyperMap()
            self.pipeline = pipeline
            # MindSpore's pipeline and gradient-accumulation passes add the micro batches' gradients into these;
            # the passes run under semi-auto parallel only (in one plain process the tagged sum is a plain sum)
            accumulate = accumulate and _get_parallel_mode() in ("semi_auto_parallel", "auto_parallel")
            self.accumulate = pipeline or accumulate
            if self.accumulate:
                self.accu_grads = self.weights.clone(prefix="accu_grads", init="zeros")
            # under optimizer parallel the gradient-accumulation pass hands the step the accumulated
            # gradient shards themselves (as mindformers' wrapper reads them); the pipeline pass does not
            self.shard_accumulated = (not pipeline) and accumulate and bool(_get_enable_parallel_optimizer())
            # the weights' EMA (``training.ema``'s update) inside the step: clones of the trainable weights,
            # which MindSpore lays out as the weights they were cloned from (sharded as the optimizer states
            # are under optimizer parallel), so the average costs each rank its share only
            self.ema_decay = float(ema_decay)
            if self.ema_decay:
                self.ema = self.weights.clone(prefix="ema", init="same")
            self.micro_scale = 1.0 / micro_size
            self.clip = float(clip_grad)
            self.scaler = loss_scaler

        def construct(self, *inputs):
            loss = self.network(*inputs)
            grads = self.grad(self.network, self.weights)(*inputs)
            if self.accumulate and not self.shard_accumulated:
                grads = ops.depend(self.accu_grads, grads)   # the pass accumulated the micro batches there
            coef = ms.Tensor(self.micro_scale, ms.float32)
            if self.scaler is not None:
                coef = coef / self.scaler.scale_value
            norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads))) * coef
            finite = ops.isfinite(norm)
            if self.clip > 0:
                coef = coef * (self.clip / ops.maximum(norm, self.clip))
            scaled = self.hyper_map(ops.partial(_scale, coef), grads)
            if self.scaler is not None:
                self.scaler.adjust(finite)
                if finite:
                    loss = ops.depend(loss, self.optimizer(scaled))
            else:
                loss = ops.depend(loss, self.optimizer(scaled))
            if self.ema_decay:     # every step, after the update (as ``WeightEMA.update``)
                loss = ops.depend(loss, self.hyper_map(ops.partial(average_into, self.ema_decay), self.ema, self.weights))
            if self.accumulate:
                loss = ops.depend(loss, self.hyper_map(_clear, self.accu_grads, scaled))
            loss = loss * self.micro_scale
            if self.scaler is not None:
                loss = loss / self.scaler.scale_value
            return loss, norm, finite

    return LossOnly, SharedLossOnly, SumOverMicroBatches, StackedPipelineCell, ParallelTrainOneStepCell


class ParallelTrainStep:
    """The sharded train step with ``training.TrainStep``'s call: ``step(micro_batches) -> (mean loss,
    grad norm, finite)``, where ``micro_batches`` are the step's ``GBS / (MBS x DP)`` micro batches
    (tuples of numpy arrays or Tensors in the model's input order): this data-parallel rank's own
    ``MBS`` samples when ``sample_axes`` (per input, the axis its samples lie along) is given, else the
    global ``MBS x DP`` rows. Per-rank inputs must have the same shapes on every rank (``check_shapes``,
    called with each new shape signature, may compare them across ranks).

    Under pipeline parallel the loss and norm are those the rank's stage sees (the last stage holds
    the loss). ``dry_run``: DryRun's simulated ranks, whose outputs hold no values (nan is reported).
    ``shared``: the pipeline's micro batches share one compiled loss subgraph (``SharedLossOnly``).
    ``zero3``: MindSpore's optimizer level 3 (``--use-torch-fsdp2``), under which pp = 1 micro batches stay
    summed in one graph (``accumulation`` says how they run: "tagged", "summed", or "" for one).
    """

    def __init__(self, model, optimizer, pc: ParallelConfig, micro_batches: int, clip_grad: float = 0.0,
                 loss_scaler=None, input_names: Sequence[str] = (), dry_run: bool = False,
                 sample_axes: Optional[Sequence[int]] = None, check_shapes=None, ema_decay: float = 0.0,
                 zero3: bool = False):
        from mindspore.parallel._utils import _get_parallel_mode

        LossOnly, SharedLossOnly, SumOver, Stacked, StepCell = _build_cells()
        pipeline = pc.pp > 1
        # the pipeline's micro batches (at least pp of them) share one compiled loss subgraph
        self.shared = pipeline and _get_parallel_mode() in ("semi_auto_parallel", "auto_parallel")
        net = (SharedLossOnly if self.shared else LossOnly)(model, loss_scaler)
        net = Stacked(net, micro_batches) if pipeline else SumOver(net, micro_batches, tagged=not zero3)
        self.cell = StepCell(net, optimizer, micro_batches, pipeline, clip_grad, loss_scaler, ema_decay,
                             accumulate=not pipeline and net.tagged)
        # pp = 1, several micro batches: "tagged" (one micro batch's activations live at a time) or "summed"
        self.accumulation = "" if pipeline or micro_batches == 1 else ("tagged" if net.tagged else "summed")
        self.cell.set_train()
        self.micro_batches = micro_batches
        self.dry_run = dry_run
        self.pc = pc
        self.sample_axes = None if sample_axes is None else tuple(sample_axes)
        self.check_shapes = check_shapes
        self._strategy_ndims = None
        self.input_names = tuple(input_names)
        self.graph_shapes: dict = {}
        self.new_shapes: list = []
        self.last_extra_outputs: list = []
        # called once with the compiled parameter layouts, before the first step runs (a sharded load
        # reads each rank's blocks then: the layouts exist only once the step is compiled)
        self.on_compiled = None

    def __call__(self, micro_batches):
        import mindspore as ms

        if len(micro_batches) != self.micro_batches:
            raise ValueError(f"expected {self.micro_batches} micro-batches per step, got {len(micro_batches)}")
        arrays = stack_micro_batches([[t.asnumpy() if hasattr(t, "asnumpy") else t for t in mb]
                                      for mb in micro_batches], self.input_names)
        signature = tuple(tuple(a.shape[1:]) for a in arrays)
        self.new_shapes = [] if signature in self.graph_shapes else [signature]
        ndims = tuple(a.ndim for a in arrays)
        if self.sample_axes is not None and ndims != self._strategy_ndims:
            # before the first compile, and again when an input's rank changes (Qwen2.5-VL's segment ids
            # are [N] or [segments, size]): the dataset strategy names each input's axes
            from ms_mm.parallel.context import set_dataset_strategy

            if len(self.sample_axes) != len(arrays):
                raise ValueError(f"sample_axes names {len(self.sample_axes)} inputs, the batch has {len(arrays)}")
            # stacked [micro batches, ...]: each input's sample axis moves one to the right
            axes = [(n, axis + 1) for n, axis in zip(ndims, self.sample_axes)]
            set_dataset_strategy(self.pc, axes)
            if not self.pc.pp > 1:      # each micro batch's slice keeps the rank's own rows where they are
                split = tuple(tuple(self.pc.dp if i == axis else 1 for i in range(n)) for n, axis in axes)
                for take in self.cell.network.micro_inputs:
                    take.shard_inputs(split)
            self._strategy_ndims = ndims
        if self.new_shapes and self.check_shapes is not None:
            self.check_shapes(signature)
        self.graph_shapes[signature] = self.graph_shapes.get(signature, 0) + 1
        tensors = [ms.Tensor(a) for a in arrays]
        if self.on_compiled is not None:
            hook, self.on_compiled = self.on_compiled, None
            self.cell.compile(*tensors)
            hook(self.parameter_layout_dict)
        out = self.cell(*tensors)
        if self.dry_run or not isinstance(out, (tuple, list)):   # DryRun: simulated, no values to read
            return float("nan"), float("nan"), True
        loss, norm, finite = out
        return float(loss.asnumpy()), float(norm.asnumpy()), bool(finite.asnumpy())

    def global_shapes(self, signature):
        """The shapes of the global batch the compiled graph sees for a micro batch of ``signature`` (this
        rank's shapes), by MindSpore's own rule for the dataset strategy in effect."""
        if self.sample_axes is None:
            return signature
        from mindspore.parallel._utils import _to_full_shapes

        full = _to_full_shapes([(self.micro_batches,) + tuple(sh) for sh in signature], self.pc.world_size)
        return tuple(tuple(int(d) for d in sh[1:]) for sh in full)

    @property
    def parameter_layout_dict(self):
        return self.cell.parameter_layout_dict

    @property
    def ema_parameters(self) -> list:
        """The weights' EMA (``ema.<weight>``, trainable weights only), or [] without one."""
        return list(self.cell.ema) if self.cell.ema_decay else []

    def write_parameter_layouts(self, path) -> None:
        """MindSpore's compiled layout of every parameter (device matrix, tensor map, slice shape) as json."""
        import json
        from pathlib import Path

        # MindSpore's layout tuple: dev_matrix, tensor_map, slice_shape, field, uniform_split,
        # opt_shard_group (the optimizer-parallel group: "" when the parameter is not sharded over dp), ...
        layouts = {name: {"dev_matrix": list(lay[0]), "tensor_map": list(lay[1]), "slice_shape": list(lay[2]),
                          "opt_shard_group": str(lay[5]) if len(lay) > 5 else "",
                          "layout": repr(tuple(lay))}
                   for name, lay in self.parameter_layout_dict.items()}
        Path(path).write_text(json.dumps(layouts, sort_keys=True))

    def data_parallel_mean(self, values):
        return np.asarray(values, np.float32)
