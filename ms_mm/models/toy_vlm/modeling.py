"""A toy vision-language model (`model_id: "toy_vlm"`) for exercising the engine on any machine.

It has the parameter-name structure of the real families (`image_encoder.encoder.*`,
`image_encoder.projector.*`, `text_decoder.*`), so freezing, checkpoint layout, resume and data
parallel behave as they do for Qwen2.5-VL, but it compiles in a second and a step costs
milliseconds. Its synthetic data is learnable: every target token is the input token shifted by the
class of the sample's "image", so the loss falls quickly when both towers train.

model json: {"model_id": "toy_vlm", "vocab_size": 32, "hidden_size": 32, "image_dim": 16,
             "num_classes": 4, "seq_length": 16,
             "image_encoder": {"vision_encoder": {"freeze": false}, "vision_projector": {"freeze": false}},
             "text_decoder": {"freeze": false}}
data json:  {"num_samples": 256}  (all optional)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_NAMES = ("input_ids", "pixel_values", "labels")


@dataclass
class ToyConfig:
    vocab_size: int = 32
    hidden_size: int = 32
    image_dim: int = 16
    num_classes: int = 4
    seq_length: int = 16

    @classmethod
    def from_model_json(cls, d: dict) -> "ToyConfig":
        kw = {k: d[k] for k in ("vocab_size", "hidden_size", "image_dim", "num_classes", "seq_length") if k in d}
        cfg = cls(**kw)
        for k, v in vars(cfg).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"toy_vlm model json: {k}={v!r} must be a positive int")
        return cfg


def build_toy_model(cfg: ToyConfig, compute_dtype=None):
    import mindspore as ms
    from mindspore import nn, ops

    dtype = compute_dtype or ms.float32

    def param(shape, name, scale=0.1, seed=0):
        rng = np.random.default_rng(abs(hash(name)) % (2 ** 32) if seed is None else seed)
        return ms.Parameter(ms.Tensor((rng.standard_normal(shape) * scale).astype(np.float32)), name=name)

    class Linear(nn.Cell):
        def __init__(self, fan_in, fan_out, seed):
            super().__init__()
            self.weight = param((fan_out, fan_in), "weight", 1.0 / np.sqrt(fan_in), seed)
            self.bias = ms.Parameter(ms.Tensor(np.zeros(fan_out, np.float32)), name="bias")

        def construct(self, x):
            return ops.matmul(x, ops.cast(self.weight, x.dtype).T) + ops.cast(self.bias, x.dtype)

    class Encoder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.encoder = Linear(cfg.image_dim, cfg.hidden_size, 1)
            self.projector = Linear(cfg.hidden_size, cfg.hidden_size, 2)

        def construct(self, pixel_values):
            return self.projector(ops.tanh(self.encoder(pixel_values)))

    class Embedding(nn.Cell):
        def __init__(self):
            super().__init__()
            self.word_embeddings = param((cfg.vocab_size, cfg.hidden_size), "weight", 0.5, 3)

    class Decoder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.embedding = Embedding()
            self.mlp = Linear(cfg.hidden_size, cfg.hidden_size, 4)
            self.output_layer = Linear(cfg.hidden_size, cfg.vocab_size, 5)

    class ToyVLM(nn.Cell):
        def __init__(self):
            super().__init__()
            self.image_encoder = Encoder()
            self.text_decoder = Decoder()

        def construct(self, input_ids, pixel_values, labels):
            img = self.image_encoder(ops.cast(pixel_values, dtype))               # [B, H]
            tok = ops.cast(ops.gather(self.text_decoder.embedding.word_embeddings, input_ids, 0), dtype)
            h = tok + ops.expand_dims(img, 1)
            h = h + ops.tanh(self.text_decoder.mlp(h))
            logits = ops.cast(self.text_decoder.output_layer(h), ms.float32)      # [B, S, V]
            loss = ops.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1),
                                     ignore_index=-100)
            return loss, logits

    return ToyVLM()


class ToyLoader:
    """Deterministic synthetic batches; each rank reads its slice of every global step's samples."""

    def __init__(self, cfg: ToyConfig, num_samples, micro_batch_size, seed, rank, world_size):
        self.cfg, self.n, self.mbs = cfg, num_samples, micro_batch_size
        self.seed, self.rank, self.world = seed, rank, world_size
        self.position = 0          # global samples consumed by all ranks together
        self.skipped = 0

    def _sample(self, index):
        rng = np.random.default_rng((self.seed, index % self.n))
        cls = int(rng.integers(self.cfg.num_classes))
        proto = np.random.default_rng((self.seed, 10_000 + cls)).standard_normal(self.cfg.image_dim)
        pixels = (proto + 0.1 * rng.standard_normal(self.cfg.image_dim)).astype(np.float32)
        ids = rng.integers(0, self.cfg.vocab_size, self.cfg.seq_length)
        labels = (ids + cls + 1) % self.cfg.vocab_size
        return ids.astype(np.int32), pixels, labels.astype(np.int32)

    def __iter__(self):
        return self

    def __next__(self):
        start = self.position + self.rank * self.mbs
        samples = [self._sample(start + i) for i in range(self.mbs)]
        self.position += self.mbs * self.world
        ids, pix, lab = (np.stack(x) for x in zip(*samples))
        return {"input_ids": ids, "pixel_values": pix, "labels": lab}

    def state_dict(self):
        return {"position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))


def build_toy_loader(data_cfg, cfg, micro_batch_size, seed, rank, world_size, num_workers=0,
                     skip_bad_samples=False):
    return ToyLoader(cfg, int(data_cfg.get("num_samples", 256)), micro_batch_size, seed, rank, world_size)
