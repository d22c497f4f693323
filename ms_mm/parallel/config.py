"""ParallelConfig: the parallel sizes of a run and the checks that they fit the cluster and the model.

    from ms_mm.parallel import ParallelConfig
    pc = ParallelConfig(world_size=8, tp=2, pp=1)        # dp derived: 8 / (2*1*1) = 4
    pc.dp                                                # 4
    pc.check_model(model_config)                         # heads, kv heads, ffn, vocab, pp layers

Constructing a ``ParallelConfig`` checks the arithmetic of the sizes on their own (every size a
positive int, ``world_size`` divisible by ``tp*pp*cp``, ``dp`` consistent, ``ep`` dividing ``dp``,
pipeline layer lists of length ``pp``); ``check_model`` checks them against a model config
through the family's plan (tp dividing attention heads, KV heads, FFN width, vocabulary;
``llm_pp_layers`` / ``vit_pp_layers`` summing to the model's depth). Every failure raises
``ParallelConfigError`` (a ``ValueError``) with one message naming the size, the value, and the
parameter / shape that does not divide.

Pipeline layer lists follow MindSpeed-MM: ``llm_pp_layers=[1, 10, 10, 7]`` gives the number of
LLM layers of each stage; the nested form ``[[1, 10, 10, 7]]`` (one list per virtual pipeline
chunk) is accepted with a single chunk. ``vit_pp_layers`` does the same for the vision tower
(``[32, 0, 0, 0]``: all blocks on stage 0). Left as ``None`` they default to an even split.

Sizes use the MindSpeed names too: ``ParallelConfig.from_megatron(world_size=8,
tensor_model_parallel_size=2, ...)`` maps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from ms_mm.parallel.errors import ParallelConfigError  # noqa: F401  (re-exported: its public home)


@dataclass(frozen=True)
class Divisibility:
    """``size_name`` (e.g. ``tp``) must divide ``value``, which is ``what`` of ``param`` with ``shape``."""

    size_name: str
    what: str          # e.g. "text.num_key_value_heads"
    value: int
    param: str = ""    # e.g. "text_decoder.decoder.layers.*.self_attention.linear_qkv.weight"
    shape: tuple = ()
    why: str = ""      # e.g. "linear_qkv is split by KV group"


def _as_layer_list(name, value):
    """Accept [a, b, ...] or MindSpeed's nested [[a, b, ...]] (one virtual-pipeline chunk)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != 1:
            raise ParallelConfigError(
                f"{name}={list(map(list, value))}: {len(value)} virtual-pipeline chunks given; "
                f"virtual pipeline is not supported, give one list with one entry per stage")
        value = value[0]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       and v >= 0 for v in value):
        raise ParallelConfigError(f"{name}={value!r}: expected a list of non-negative ints (layers per stage)")
    return list(value)


def even_split(layers: int, stages: int) -> List[int]:
    """``layers`` spread over ``stages`` as evenly as possible, earlier stages taking the remainder."""
    base, extra = divmod(layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


@dataclass
class ParallelConfig:
    """Parallel sizes of one run. ``dp`` is derived from the others when left ``None``."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: Optional[int] = None
    llm_pp_layers: Optional[List[int]] = None
    vit_pp_layers: Optional[List[int]] = None

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            self._positive(name)
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            raise ParallelConfigError(
                f"world_size={self.world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} "
                f"= {model_parallel}")
        derived = self.world_size // model_parallel
        if self.dp is None:
            self.dp = derived
        else:
            self._positive("dp")
            if self.dp != derived:
                raise ParallelConfigError(
                    f"dp={self.dp} does not match world_size / (tp*pp*cp) = {self.world_size} / {model_parallel} "
                    f"= {derived}")
        if self.dp % self.ep:
            raise ParallelConfigError(
                f"ep={self.ep} does not divide the data-parallel size dp={self.dp} "
                f"(experts are spread over data-parallel ranks)")
        self.llm_pp_layers = _as_layer_list("llm_pp_layers", self.llm_pp_layers)
        self.vit_pp_layers = _as_layer_list("vit_pp_layers", self.vit_pp_layers)
        for name in ("llm_pp_layers", "vit_pp_layers"):
            layers = getattr(self, name)
            if layers is not None and len(layers) != self.pp:
                raise ParallelConfigError(
                    f"{name}={layers} has {len(layers)} stage(s) but pp={self.pp}")

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank``: which slice of the global batch it holds. A pipeline
        stage holds ``world_size / pp`` consecutive ranks laid out as a [dp, tp * cp] device matrix
        (row-major: the model-parallel peers of a dp rank are neighbours), the layout the data-parallel
        dataset strategy (``ms_mm.parallel.context.dataset_strategy``) declares."""
        per_stage = self.world_size // self.pp
        return (rank % per_stage) // (per_stage // self.dp)

    def stage_of_rank(self, rank: int) -> int:
        """The pipeline stage of global ``rank`` (a stage holds ``world_size / pp`` consecutive ranks)."""
        return rank // (self.world_size // self.pp)

    def _positive(self, name):
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelConfigError(f"{name}={value!r} must be a positive int")

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_megatron(cls, world_size, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                      context_parallel_size=1, expert_model_parallel_size=1, llm_pp_layers=None,
                      vit_pp_layers=None) -> "ParallelConfig":
        """Build from MindSpeed / Megatron argument names."""
        return cls(world_size=world_size, tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size,
                   cp=context_parallel_size, ep=expert_model_parallel_size, llm_pp_layers=llm_pp_layers,
                   vit_pp_layers=vit_pp_layers)

    # ------------------------------------------------------------------------------ model checks
    def check_divisible(self, requirements: Sequence[Divisibility]) -> None:
        """Raise on the first requirement whose parallel size does not divide its value."""
        for req in requirements:
            size = getattr(self, req.size_name)
            if req.value % size:
                where = ""
                if req.param:
                    where = f" ({req.param} has shape {list(req.shape)}"
                    where += f"; {req.why})" if req.why else ")"
                elif req.why:
                    where = f" ({req.why})"
                raise ParallelConfigError(
                    f"{req.size_name}={size} does not divide {req.what}={req.value}{where}")

    def stage_layers(self, name: str, total: int, default_all_first: bool = False) -> List[int]:
        """Layers per pipeline stage for ``name`` (``llm_pp_layers`` / ``vit_pp_layers``), checked to sum
        to ``total``. Unset lists default to an even split (or everything on stage 0)."""
        layers = getattr(self, name)
        if layers is None:
            if default_all_first:
                return [total] + [0] * (self.pp - 1)
            return even_split(total, self.pp)
        if sum(layers) != total:
            raise ParallelConfigError(
                f"{name}={layers} sums to {sum(layers)} layers but the model has {total}")
        return list(layers)

    def vlm_layer_stages(self, vit_layers: int, llm_layers: int):
        """(pipeline stage of each vision block, of each LLM layer): ``vit_pp_layers`` (default: all on
        stage 0) and ``llm_pp_layers`` (default: an even split) expanded layer by layer."""
        vit = self.stage_layers("vit_pp_layers", vit_layers, default_all_first=True)
        llm = self.stage_layers("llm_pp_layers", llm_layers)
        expand = lambda counts: [stage for stage, n in enumerate(counts) for _ in range(n)]
        return expand(vit), expand(llm)

    def check_model(self, model_config) -> "ParallelConfig":
        """Check the sizes against ``model_config`` with its family's plan; returns self."""
        from ms_mm.parallel.plans import plan_for_config
        plan_for_config(model_config).check(self, model_config)
        return self

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep,
                "dp": self.dp, "llm_pp_layers": self.llm_pp_layers, "vit_pp_layers": self.vit_pp_layers}
