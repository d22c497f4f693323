"""Lumina-mGPT 2.0 decoder config (Chameleon architecture with Lumina's training switches), its
presets, and the reader of the checkpoint's ``config.json`` (`config_from_hf`).

Upstream conventions named once here:
* q/k norm = LayerNorm over head_dim with eps **1e-5 hard-coded** (``QK_NORM_EPS``, not
  rms_norm_eps) and a per-head affine whose (model_parallel_size, head_dim) weight/bias is
  repeat-interleaved over the heads (num_heads / mp query heads, num_kv_heads / mp key heads per row);
* RMSNorm with rms_norm_eps; RoPE rotate-half with rope_theta (optional linear scaling);
* ``swin_norm``: norms after attention / MLP instead of before;
* loss = CE + z_loss_weight * mean(logsumexp(logits)^2) over the target positions;
* ``mask_image_logits``: the logits of the tokens whose ``vocabulary_map`` name starts with
  ``IMGIMG`` (Chameleon's original VQ image tokens) are set to the fp32 minimum;
* the embedding row ``pad_token_id`` is never trained (torch ``padding_idx``).
The image-token layout ids (`LuminaTokenConfig`) are resolved from ``vocabulary_map`` names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from ms_mm.models import check_int

__all__ = ["LuminaMGPT2Config", "LuminaTokenConfig", "config_from_hf", "QK_NORM_EPS", "config_from_mindspeed",
           "mindspeed_model_json", "config_from_json", "claims_json", "is_nested_mindspeed", "mindspeed_fsdp1"]

QK_NORM_EPS = 1e-5  # ChameleonLayerNorm.forward's literal eps


@dataclass
class LuminaTokenConfig:
    """Token ids of the image layout (FlexARItemProcessor): ``<racm3:break>`` starts an image,
    ``<reserved0{8800+n}>`` says n grids of 32 px (height, then width), ``<reserved08799>`` ends each
    row of codes, ``<eoss>`` ends the image; code c is token ``code_offset + c``; ``<reserved08706>``
    is the conversation's turn separator. The defaults are the Chameleon (Lumina-mGPT 1) tokenizer's ids; a
    checkpoint's ``vocabulary_map`` resolves them by name (`from_vocabulary_map`), and the "7B" preset carries
    the 2.0 release's where upstream publishes them (see ``_PRESETS``)."""
    image_start_id: int = 8197       # <racm3:break>
    image_end_id: int = 8196         # <eoss>
    newline_id: int = 8803           # <reserved08799>
    grid_base_id: int = 8804         # <reserved08800>: grid count n is grid_base_id + n
    code_offset: int = 155000        # <MOVQGAN0> / FlexARItemProcessor.get_image_token
    separator_id: int = 8710         # <reserved08706>
    codebook_size: int = 16384
    patch_size: int = 32             # pixels per grid
    downsample: int = 8              # pixels per code (MoVQGAN's factor)

    def validate(self) -> "LuminaTokenConfig":
        for f in fields(self):
            check_int(self, f.name, "LuminaTokenConfig", minimum=0)
        if self.patch_size % self.downsample:
            raise ValueError(f"LuminaTokenConfig.patch_size: {self.patch_size} is not a multiple of "
                             f"downsample={self.downsample}")
        return self

    @classmethod
    def from_vocabulary_map(cls, vocab: Dict[str, int], **overrides) -> "LuminaTokenConfig":
        """Resolve the ids by name (the released names; a tiny vocabulary keeps the names, not the ids)."""
        def get(name, default):
            return int(vocab[name]) if name in vocab else default

        d = cls()
        codes = sorted(int(v) for k, v in vocab.items() if k.startswith("<MOVQGAN"))
        kw = dict(image_start_id=get("<racm3:break>", d.image_start_id),
                  image_end_id=get("<eoss>", d.image_end_id),
                  newline_id=get("<reserved08799>", d.newline_id),
                  grid_base_id=get("<reserved08800>", d.grid_base_id),
                  code_offset=get("<MOVQGAN0>", d.code_offset),
                  separator_id=get("<reserved08706>", d.separator_id),
                  codebook_size=len(codes) if codes else d.codebook_size)
        kw.update(overrides)
        return cls(**kw).validate()


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "model_parallel_size",
               "make_vocab_size_divisible_by")


@dataclass
class LuminaMGPT2Config:
    """Field names = the checkpoint's config.json (ChameleonXLLMXConfig)."""
    vocab_size: int = 171385
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 10240
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None   # None or {"type": "linear", "factor": f}
    model_parallel_size: int = 1
    swin_norm: bool = False
    z_loss_weight: float = 0.0
    mask_image_logits: bool = False
    masked_image_token_ids: Tuple[int, ...] = ()   # vocabulary_map ids of IMGIMG* names
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: int = 0
    eos_token_id: int = 2
    tokens: LuminaTokenConfig = field(default_factory=LuminaTokenConfig)
    # Megatron's --make-vocab-size-divisible-by: the embedding and output rows are padded up to a multiple
    # of it (the padded logits are masked out), so the optimizer parallel of `fsdp1` can shard them over dp
    # (171385 rows divide by no card count). 1: no padding.
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        if isinstance(self.tokens, dict):
            self.tokens = LuminaTokenConfig(**self.tokens)
        self.masked_image_token_ids = tuple(int(i) for i in self.masked_image_token_ids)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output layer: vocab_size rounded up to make_vocab_size_divisible_by."""
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "LuminaMGPT2Config":
        def bad(name, why):
            raise ValueError(f"LuminaMGPT2Config.{name}: {why}")

        for name in _INT_FIELDS:
            check_int(self, name, "LuminaMGPT2Config")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
        if self.head_dim % 2:
            bad("hidden_size", f"head_dim = {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide num_attention_heads="
                                       f"{self.num_attention_heads}")
        mp = self.model_parallel_size
        if self.num_attention_heads % mp:
            bad("model_parallel_size", f"{mp} does not divide num_attention_heads={self.num_attention_heads} "
                                       f"(the q_norm rows are shared by num_heads / mp heads)")
        if self.num_key_value_heads % mp:
            bad("model_parallel_size", f"{mp} does not divide num_key_value_heads={self.num_key_value_heads} "
                                       f"(the k_norm rows are shared by num_kv_heads / mp heads)")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        if self.rope_theta <= 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict) or rs.get("type") != "linear" or not float(rs.get("factor", 0)) > 0:
                bad("rope_scaling", f"only None or {{'type': 'linear', 'factor': > 0}} is supported, got {rs!r}")
        if self.z_loss_weight < 0:
            bad("z_loss_weight", f"must be >= 0, got {self.z_loss_weight!r}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.attention_dropout != 0.0:
            bad("attention_dropout", f"only 0.0 is supported (Lumina-mGPT trains with it off), got "
                                     f"{self.attention_dropout!r}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"{self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        out = [i for i in self.masked_image_token_ids if not 0 <= i < self.vocab_size]
        if out:
            bad("masked_image_token_ids", f"ids {out[:5]} are outside the vocabulary [0, {self.vocab_size})")
        self.tokens.validate()
        last_code = self.tokens.code_offset + self.tokens.codebook_size - 1
        if last_code >= self.vocab_size:
            bad("tokens.code_offset", f"image codes reach id {last_code}, beyond vocab_size={self.vocab_size}")
        return self

    # ---------------------------------------------------------------- forms
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["masked_image_token_ids"] = list(self.masked_image_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LuminaMGPT2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LuminaMGPT2Config.from_dict: unknown field(s) {unknown}")
        return cls(**d).validate()

    @classmethod
    def preset(cls, name: str) -> "LuminaMGPT2Config":
        if name not in _PRESETS:
            raise ValueError(f"LuminaMGPT2Config.preset: unknown preset {name!r}; known: {sorted(_PRESETS)}")
        kw = dict(_PRESETS[name])
        kw["tokens"] = LuminaTokenConfig(**kw.get("tokens", {}))
        return cls(**kw).validate()


_PRESETS: Dict[str, Dict[str, Any]] = {
    # ../shared/fixtures/lumina_mgpt2/forward/hf/config.json
    "tiny": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, model_parallel_size=2, z_loss_weight=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 tokens=dict(image_start_id=97, image_end_id=96, newline_id=199, grid_base_id=200, code_offset=256,
                             separator_id=106, codebook_size=64)),
    # Lumina-mGPT 2.0 7B, every number from upstream (the released config.json itself is not in either repository):
    #  * Ascend/MindSpeed-MM examples/lumina/mgpt2/model.json (commit 624876af, "predictor" block + top-level
    #    "z_loss_weight"): vocab_size, max_position_embeddings, hidden/intermediate sizes, layers, heads, kv heads,
    #    rms_norm_eps, rope_theta, rope_scaling, swin_norm, biases, tie, act, dropout, mask_image_logits,
    #    pad/bos/eos ids and z_loss_weight (the same 1e-5 as Alpha-VLLM/Lumina-mGPT-2.0 lumina_mgpt/scripts/train.sh);
    #  * model_parallel_size 1: MindSpeed-MM mindspeed_mm/models/predictor/dits/lumina_mgpt2.py ChameleonAttention
    #    hard-codes it (its q/k-norm weights, one row, load the released checkpoint);
    #  * image ids: Alpha-VLLM/Lumina-mGPT-2.0 lumina_mgpt/inference_solver.py (decode_ids: 151665 starts an image,
    #    151666 (<eoss>, also generate()'s eos) ends it, 151670 is the row newline; codes 155000..171383) and
    #    MindSpeed-MM mindspeed_mm/data/data_utils/lumina_item_processor.py (image_end_token_id = 151666).
    # Not published as numbers anywhere upstream (both resolve them by name from the release's vocabulary_map, as
    # config_from_hf does): the ids of <reserved08800> (grid_base_id) and <reserved08706> (separator_id); the preset
    # keeps LuminaTokenConfig's defaults for those two, which are NOT the 2.0 tokenizer's ids.
    # No qk_layernorm field exists upstream: Chameleon always applies q/k LayerNorm (QK_NORM_EPS above).
    # Training switches that differ between upstream's two recipes are MindSpeed-MM's here: dropout 0.0
    # (Lumina's train.sh: 0.05), max_position_embeddings 10240 (Lumina's train.sh overrides it with --max_seq_len 4096).
    "7B": dict(vocab_size=171385, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=10240, rms_norm_eps=1e-5,
               rope_theta=10000.0, rope_scaling=None, model_parallel_size=1, swin_norm=False, z_loss_weight=1e-5,
               mask_image_logits=False, dropout=0.0, attention_dropout=0.0, attention_bias=False, mlp_bias=False,
               hidden_act="silu", tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
               tokens=dict(image_start_id=151665, image_end_id=151666, newline_id=151670, code_offset=155000,
                           codebook_size=16384)),
}


def config_from_hf(hf: Dict[str, Any]) -> LuminaMGPT2Config:
    """The checkpoint's ``config.json`` (ChameleonXLLMXConfig.save_pretrained) -> LuminaMGPT2Config."""
    if not isinstance(hf, dict):
        raise TypeError(f"config_from_hf expects the parsed config.json dict, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in (None, "chameleon"):
        raise ValueError(f"config.json model_type is {mt!r}, expected 'chameleon' (Lumina-mGPT 2.0)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks field(s) {missing}")
    names = {f.name for f in fields(LuminaMGPT2Config)} - {"tokens", "masked_image_token_ids"}
    kw = {k: hf[k] for k in names if k in hf}
    # ChameleonConfig's own defaults where the file leaves a field out
    kw.setdefault("num_key_value_heads", hf["num_attention_heads"])
    kw.setdefault("intermediate_size", 11008)
    kw.setdefault("max_position_embeddings", 4096)
    kw.setdefault("mask_image_logits", True)
    kw.setdefault("bos_token_id", 1)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0] if kw[k] else None
    vocab = hf.get("vocabulary_map") or {}
    kw["masked_image_token_ids"] = tuple(sorted(int(v) for k, v in vocab.items() if k.startswith("IMGIMG")))
    kw["tokens"] = LuminaTokenConfig.from_vocabulary_map(vocab)
    return LuminaMGPT2Config(**kw).validate()


# ---------------------------------------------------------------- MindSpeed-MM model.json
# MindSpeed-MM's ChameleonForConditionalGeneration(**model.json) arguments -> our field names
MINDSPEED_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "swin_norm": "swin_norm", "dropout": "dropout",
    "attention_dropout": "attention_dropout", "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
    "hidden_act": "hidden_act", "pad_token_id": "pad_token_id", "z_loss_weight": "z_loss_weight",
    "model_parallel_size": "model_parallel_size", "mask_image_logits": "mask_image_logits",
}
# keys of a model.json that are training switches, not architecture (read by the family record)
MINDSPEED_SWITCHES = ("model_id", "vocabulary_map_path", "fsdp1", "movqgan_path")

# MindSpeed-MM's own form (examples/lumina/mgpt2/model.json, commit 624876af): mindspeed_mm/models/lumina_model.py
# builds ChameleonForConditionalGeneration(**model["predictor"]) and reads "z_loss_weight" (1e-5 when absent)
# and "dtype" beside it; patch_manager.py turns FSDP on when "patch"."use_fsdp1" is truthy.
# The predictor keys that model's code reads (ChameleonForConditionalGeneration / ChameleonModel arguments):
NESTED_PREDICTOR_FIELDS = {k: v for k, v in MINDSPEED_FIELDS.items()
                           if k not in ("z_loss_weight", "model_parallel_size", "mask_image_logits")}
# token ids it takes and never uses in training: ChameleonConfig's fields of the same name
NESTED_TOKEN_FIELDS = ("bos_token_id", "eos_token_id")
# what that code hard-codes whatever the json says: a json asking otherwise is refused, not silently ignored
NESTED_FIXED = {
    "model_parallel_size": 1,      # ChameleonAttention: self.model_parallel_size = 1
    "mask_image_logits": False,    # ChameleonForConditionalGeneration: self.mask_image_logits = False
    "rope_scaling": None,          # RotaryEmbedding(head_dim, max_position_embeddings, base=rope_theta): no scaling
    "tie_word_embeddings": False,  # its own lm_head nn.Linear, never tied to embed_tokens
}
NESTED_IGNORED = ("initializer_range",)   # taken, unused (weights come from the checkpoint)
# "dtype" (its autocast dtype) is accepted and left to the trainer's --bf16 / --fp16
NESTED_TOP_KEYS = ("predictor", "z_loss_weight", "dtype", "patch", "model_id", "movqgan_path")
NESTED_Z_LOSS_DEFAULT = 1e-5       # lumina_model.py: config.pop("z_loss_weight", 1e-5)


def is_nested_mindspeed(d: Dict[str, Any]) -> bool:
    """MindSpeed-MM's own Lumina model.json: the architecture under "predictor", with its vocabulary map path."""
    return isinstance(d.get("predictor"), dict) and "vocabulary_map_path" in d["predictor"]


def mindspeed_fsdp1(d: Dict[str, Any]):
    """The FSDP switch of a model.json (None = off): our flat ``fsdp1`` (present = on), or MindSpeed-MM's
    ``patch.use_fsdp1``, which its patch manager applies only when truthy."""
    if not is_nested_mindspeed(d):
        return d.get("fsdp1")
    patch = d.get("patch") or {}
    return patch.get("use_fsdp1") or None


def _nested_overrides(model_json: Dict[str, Any], where: str) -> Tuple[str, Dict[str, Any]]:
    """(vocabulary_map_path, {our field: value}) of MindSpeed-MM's nested model.json."""
    unknown = sorted(set(model_json) - set(NESTED_TOP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} beside \"predictor\" (known: {sorted(NESTED_TOP_KEYS)})")
    patch = model_json.get("patch")
    if patch is not None and (not isinstance(patch, dict) or set(patch) - {"use_fsdp1"}):
        raise ValueError(f"{where}: patch: only \"use_fsdp1\" is read, got {patch!r}")
    predictor = model_json["predictor"]
    known = set(NESTED_PREDICTOR_FIELDS) | set(NESTED_TOKEN_FIELDS) | set(NESTED_FIXED) | set(NESTED_IGNORED)
    unknown = sorted(set(predictor) - known - {"vocabulary_map_path"})
    if unknown:
        raise ValueError(f"{where}: predictor: unknown key(s) {unknown} (known: {sorted(known)})")
    kw = {dst: predictor[src] for src, dst in NESTED_PREDICTOR_FIELDS.items() if src in predictor}
    kw.update({k: predictor[k] for k in NESTED_TOKEN_FIELDS if k in predictor})
    for key, value in NESTED_FIXED.items():
        if predictor.get(key, value) != value:
            raise ValueError(f"{where}: predictor.{key} is {predictor[key]!r}, but MindSpeed-MM's Lumina model "
                             f"always uses {value!r} (it ignores this key); set {value!r} or leave it out")
        kw[key] = value
    kw["z_loss_weight"] = model_json.get("z_loss_weight", NESTED_Z_LOSS_DEFAULT)
    return predictor["vocabulary_map_path"], kw


def config_from_mindspeed(model_json: Dict[str, Any], where: str = "model json") -> LuminaMGPT2Config:
    """MindSpeed-MM's Lumina ``model.json`` -> LuminaMGPT2Config, in either form: flat (our examples:
    ChameleonForConditionalGeneration's arguments at the top) or MindSpeed-MM's own, nested under
    ``"predictor"`` (`is_nested_mindspeed`; read as its code reads it, see ``NESTED_*`` above).
    ``vocabulary_map_path`` (the released checkpoint directory) supplies ``config.json``: the
    vocabulary map (image-layout ids, IMGIMG tokens) and every field the model.json leaves out; the
    model.json's own fields win."""
    import json
    from pathlib import Path

    if is_nested_mindspeed(model_json):
        vpath, overrides = _nested_overrides(model_json, where)
        vpath_key = "predictor.vocabulary_map_path"
    else:
        unknown = sorted(set(model_json) - set(MINDSPEED_FIELDS) - set(MINDSPEED_SWITCHES))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(MINDSPEED_FIELDS)})")
        vpath = model_json.get("vocabulary_map_path")
        overrides = {dst: model_json[src] for src, dst in MINDSPEED_FIELDS.items() if src in model_json}
        vpath_key = "vocabulary_map_path"
    if not vpath:
        raise ValueError(f"{where}: {vpath_key} (the Lumina-mGPT 2.0 checkpoint directory, whose "
                         f"config.json holds the vocabulary_map) is required")
    cfg_file = Path(vpath) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{where}: {vpath_key} {vpath}: no config.json there (the Lumina-mGPT 2.0 "
                         f"checkpoint directory with its vocabulary_map)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return config_from_hf({**hf, **overrides})


def mindspeed_model_json(config: LuminaMGPT2Config, vocabulary_map_path, **switches) -> Dict[str, Any]:
    """The MindSpeed-MM model.json of `config`, flat form (`switches`: fsdp1, movqgan_path ...)."""
    d = config.to_dict()
    out: Dict[str, Any] = {"model_id": "lumina", "vocabulary_map_path": str(vocabulary_map_path)}
    for src, dst in MINDSPEED_FIELDS.items():
        out[src] = d[dst]
    out.update({k: v for k, v in switches.items() if v is not None})
    return out


def claims_json(d: Dict[str, Any]) -> bool:
    return d.get("model_type") == "chameleon" or "vocabulary_map_path" in d or is_nested_mindspeed(d)


def config_from_json(d: Dict[str, Any]) -> LuminaMGPT2Config:
    """Any json form: ``{"preset": name}``, an HF config.json, a MindSpeed-MM model.json (flat, with
    ``vocabulary_map_path``, or nested under ``"predictor"``), or our ``to_dict()``. A model.json's
    FSDP switch (flat ``fsdp1``, nested ``patch.use_fsdp1``: `mindspeed_fsdp1`) rides along as the
    attribute ``config.fsdp1`` (checked by the family's `check_parallel_sizes`)."""
    if "preset" in d:
        config = LuminaMGPT2Config.preset(d["preset"])
    elif "model_type" in d:
        config = config_from_hf(d)
    elif "vocabulary_map_path" in d or "num_layers" in d or is_nested_mindspeed(d):
        config = config_from_mindspeed(d)
    else:
        config = LuminaMGPT2Config.from_dict({k: v for k, v in d.items() if k not in MINDSPEED_SWITCHES})
    config.fsdp1 = mindspeed_fsdp1(d)
    return config
