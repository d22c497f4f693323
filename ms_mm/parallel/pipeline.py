"""Pipeline micro-batching for models whose inputs are not all batch-major.

MindSpore's ``nn.PipelineCell`` cuts every input into micro batches along axis 0. That is wrong
for Qwen2.5-VL's inputs: ``position_ids`` is ``[3, B, S]``, and the vision inputs are per patch
with indices into the whole batch's patches. ``StackedPipelineCell`` instead takes inputs that
already carry a leading micro-batch axis (``[M, ...]``: each micro batch prepared on the host
by ``build_model_inputs`` on its own samples, so its indices are local), and feeds micro batch
``i`` to the network as ``x[i]``. Like ``PipelineCell`` it sums the micro-batch losses through
``Add`` primitives tagged ``pipeline_end``, which is how MindSpore's pipeline pass finds them.

``PipelineTrainOneStepCell`` is the matching train step (gradients accumulated over the micro
batches, then one optimizer update); unlike MindSpore's internal one it does not make host
copies of the stage's parameters while compiling, so real-size stages fit a DryRun host.
"""
from __future__ import annotations

from mindspore import nn, ops


class _TakeMicroBatch(nn.Cell):
    """inputs ``[M, ...]`` -> ``inputs[i]`` (a slice on the whole leading axis, then squeezed).

    ``shard_inputs(strategies)`` gives each input's slice the split the inputs arrive in (the dataset
    strategy of per-rank data: the sample axis over dp). Without it MindSpore's default strategy for the
    slice cannot split the stacked inputs' sample axis and gathers every rank's inputs onto every rank."""

    def __init__(self, index: int, grad_accu_num: int = 0):
        super().__init__()
        self.index = index
        # ``grad_accu_num``: MindSpore's gradient-accumulation tag (as ``parallel.nn.GradAccumulation`` sets it)
        self.attrs = {"grad_accu_num": grad_accu_num} if grad_accu_num else {}
        self.strided_slice = self._tagged(ops.StridedSlice())
        self.slices = None
        self.reshape = ops.Reshape()
        self.shape = ops.Shape()

    def shard_inputs(self, strategies) -> None:
        self.slices = tuple(self._tagged(ops.StridedSlice().shard((strategy,))) for strategy in strategies)

    def _tagged(self, prim):
        for key, value in self.attrs.items():
            prim.add_prim_attr(key, value)
        return prim

    def construct(self, *inputs):
        out = ()
        for j, x in enumerate(inputs):
            shape = self.shape(x)
            begin = (self.index,) + (0,) * (len(shape) - 1)
            end = (self.index + 1,) + shape[1:]
            strides = (1,) * len(shape)
            piece = (self.strided_slice(x, begin, end, strides) if self.slices is None
                     else self.slices[j](x, begin, end, strides))
            out += (self.reshape(piece, shape[1:]),)
        return out


class StackedPipelineCell(nn.Cell):
    """Run ``network`` once per micro batch of stacked inputs and sum the outputs (the loss)."""

    def __init__(self, network: nn.Cell, micro_size: int):
        super().__init__(auto_prefix=False)
        if not isinstance(micro_size, int) or micro_size < 1:
            raise ValueError(f"micro_size={micro_size!r} must be a positive int")
        self.network = network
        self.micro_size = micro_size
        self.micro_inputs = nn.CellList([_TakeMicroBatch(i) for i in range(micro_size)])
        self.add_list = [ops.Add().add_prim_attr("pipeline_end", i) for i in range(micro_size)]

    def construct(self, *inputs):
        ret = None
        for i in range(self.micro_size):
            output = self.network(*self.micro_inputs[i](*inputs))
            ret = output if ret is None else self.add_list[i](ret, output)
        return ret


def _scaled(scale, accu_grad):
    return accu_grad * scale


def _clear(accu_grad, grad):
    # accu * 0 rather than zeros_like(accu): MindSpore folds zeros_like of a parameter into a
    # full-size constant at compile time (two host copies of the stage's parameters), a Mul on a
    # parameter stays a runtime op. (A non-finite accumulated gradient stays non-finite; the step
    # that produced it is already lost.)
    accu_grad = ops.depend(accu_grad, grad)
    return ops.assign(accu_grad, accu_grad * 0)


class PipelineTrainOneStepCell(nn.TrainOneStepCell):
    """Pipeline train step: forward/backward over the micro batches, the optimizer on the gradients
    MindSpore's pipeline pass accumulated into ``accu_grads`` (averaged), then the buffers cleared.

    The same steps as MindSpore's internal ``_TrainGradAccuStepCell`` (what ``Model`` builds for
    pipeline training), without its compile-time zero constants (see ``_clear``).
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, micro_size: int):
        super().__init__(network, optimizer)
        self.accu_grads = self.weights.clone(prefix="accu_grads", init="zeros")
        self.hyper_map = ops.HyperMap()
        self.micro_scale = 1.0 / micro_size

    def construct(self, *inputs):
        loss = self.network(*inputs)
        grads = self.grad_no_sens(self.network, self.weights)(*inputs)
        accu_grads = ops.depend(self.accu_grads, grads)
        succ = self.optimizer(self.hyper_map(ops.partial(_scaled, self.micro_scale), accu_grads))
        loss = ops.depend(loss, succ)
        clear = self.hyper_map(_clear, accu_grads, grads)
        return ops.depend(loss, clear)
