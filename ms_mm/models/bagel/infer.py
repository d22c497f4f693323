"""BAGEL inference from a checkpoint: text-to-image, editing and understanding, reusing the training Cells.

    python -m ms_mm.models.bagel.infer t2i  --load SAVE --hf-dir HF --prompt "a red circle on a blue background" --out x.png
    python -m ms_mm.models.bagel.infer edit --load SAVE --hf-dir HF --image in.png --prompt "make the circle green" --out y.png
    python -m ms_mm.models.bagel.infer und  --load SAVE --hf-dir HF --image in.png --question "What colour is the shape?"

`--load` is an MM checkpoint (a training save dir or a converted release; `--ema` takes its `ema/`
weights) or a release directory itself; `--hf-dir` the release directory whose configs and tokenizer
describe it (default: `--load` when that is a release). Python: `BagelInferencer.from_checkpoint(...)`
with `.text_to_image(prompt, ...)`, `.edit(image, prompt, ...)`, `.understand(image, question, ...)`.

No KV cache: every step re-runs `Bagel.velocity` / `Bagel.text_logits` (the training forward's pieces,
same parameters) over the whole sequence, padded to fixed budgets so one graph serves every step. The
sampler is upstream's `generate_image`: timesteps linspace(1, 0, num_timesteps) shifted by
`timestep_shift`, Euler steps x <- x - v dt, classifier-free guidance on text (`cfg_text_scale`) and on the
input image (`cfg_img_scale`, editing) inside `cfg_interval`, renormalised (`cfg_renorm_type` global /
channel / text_channel, `cfg_renorm_min`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ms_mm.models.bagel import processing as P

__all__ = ["BagelInferencer", "main", "flow_timesteps"]


def flow_timesteps(num_timesteps: int, shift: float):
    """(times t_i, steps dt_i) of the sampler: t = linspace(1, 0, N) shifted, the last (0) dropped."""
    t = np.linspace(1.0, 0.0, num_timesteps, dtype=np.float32)
    t = (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)
    return t[:-1], (t[:-1] - t[1:]).astype(np.float32)


def _settings(config, max_num_tokens=512, vit=None, latent=None, images=2, side=None) -> P.DataSettings:
    side = side or config.max_latent_size * config.latent_downsample
    latent = latent or min((side // config.latent_downsample) ** 2 * 2, max_num_tokens // 2)
    vit = vit or min(config.vit_max_num_patch_per_side ** 2, max_num_tokens // 4)
    budgets = P.Budgets(max_num_tokens=max_num_tokens, max_num_vit_tokens=vit, max_num_latent_tokens=latent,
                        max_num_vae_images=images, vae_image_size=(side, side), max_num_ce_tokens=1,
                        expected_num_tokens=max_num_tokens, max_num_tokens_per_sample=max_num_tokens,
                        prefer_buffer_before=0, max_buffer_size=0)
    return P.DataSettings(groups=[], budgets=budgets, model_path="", text_cond_dropout_prob=0.0,
                          vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0, vit_patch_size=config.vit.patch_size,
                          max_num_patch_per_side=config.vit_max_num_patch_per_side,
                          max_latent_size=config.max_latent_size, vae_image_downsample=config.latent_downsample,
                          interpolate_pos=bool(config.interpolate_pos))


class BagelInferencer:
    def __init__(self, config, state: dict, tokenizer, max_num_tokens: int = 512, image_size: Optional[int] = None):
        import mindspore as ms

        from ms_mm.models.bagel.modeling import Bagel, LatentDecoder
        from ms_mm.models.bagel.tokenizer import special_token_ids
        from ms_mm.training.weights import load_state_dict

        ms.set_context(mode=ms.GRAPH_MODE)
        self.ms = ms
        self.config, self.tokenizer = config, tokenizer
        self.special = special_token_ids(tokenizer)
        self.net = Bagel(config)
        load_state_dict(self.net, state)
        self.net.set_train(False)
        self._velocity = ms.jit(self.net.velocity)
        self._logits = ms.jit(self.net.text_logits)
        self._encode = ms.jit(self.net.vae.construct)
        self._decode = ms.jit(LatentDecoder(self.net.vae).construct)
        side = image_size or min(config.max_latent_size * config.latent_downsample, 1024)
        self.s = _settings(config, max_num_tokens, side=side)
        vit_side = min(config.vit_max_num_patch_per_side, config.vit.num_patches_per_side) * config.vit.patch_size
        self.gen_transform = P.ImageTransform(side, config.latent_downsample, config.latent_downsample,
                                              max_pixels=side * side)
        self.vit_transform = P.ImageTransform(vit_side, config.vit.patch_size, config.vit.patch_size,
                                              max_pixels=vit_side * vit_side)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, load: str, hf_dir: Optional[str] = None, ema: bool = False, **kwargs):
        from transformers import AutoTokenizer

        import convert
        from adapters.bagel import read_hf_config
        from ms_mm.models.bagel.config import config_from_hf
        from ms_mm.training import mm_checkpoint as mmc

        load_path = Path(load)
        hf = Path(hf_dir) if hf_dir else load_path
        if not (hf / "llm_config.json").is_file():
            raise FileNotFoundError(f"{hf}: no llm_config.json (give --hf-dir, the release directory with the configs "
                                    f"and tokenizer)")
        if (load_path / "ema.safetensors").is_file():           # a release directory itself
            config, state = convert.load_hf_as_mm(load_path, "bagel")
        else:
            config = config_from_hf(read_hf_config(hf))
            latest = mmc.latest_iteration(load_path)
            d = load_path if latest is None else mmc.iteration_dir(load_path, latest)
            if ema:
                if not (d / "ema").is_dir():
                    raise FileNotFoundError(f"{d}: no ema/ weights (trained without --ema?)")
                d = d / "ema"
            state = mmc.load_model(str(d), float32=True)
        return cls(config, state, AutoTokenizer.from_pretrained(str(hf)), **kwargs)

    # ------------------------------------------------------------------ sequences
    def _ids(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text))

    def _image(self, image, transform):
        from PIL import Image

        img = Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image.convert("RGB")
        return transform(img)

    def _pack(self, plan, texts, images):
        packer = P.Packer(self.s, self.special, np.random.default_rng(0))
        sample = {"sequence_plan": plan, "text_ids_list": texts, "images": images}
        packer.add(sample, P.sample_cost(sample, self.s))
        batch = packer.batch()
        inputs = P.padded_model_inputs(batch, self.config, self.s.budgets, np.random.default_rng(0),
                                       self.config.latent_downsample)
        return batch, inputs

    def _common(self, inputs):
        T = self.ms.Tensor
        return [T(inputs[k]) for k in ("text_ids", "vit_pixels", "vit_position_ids", "vit_attention_mask")]

    def _clean_latents(self, inputs, n_clean):
        """x0 tokens [T_l, p*p*z] of the packed VAE images (the frozen VAE, as in training)."""
        _, latent = self._encode(self.ms.Tensor(inputs["padded_images"]))
        flat = latent.asnumpy().reshape(-1)
        return flat[inputs["latent_gather_index"]]

    def velocity(self, inputs, x_t, t):
        """llm2vae at every latent row [T_l, p*p*z] for latent tokens x_t [T_l, .] at times t [T_l]."""
        T, b = self.ms.Tensor, self.s.budgets
        rows = (b.max_num_text_tokens + b.max_num_vit_tokens + np.arange(b.max_num_latent_tokens)).astype(np.int32)
        out = self._velocity(*self._common(inputs), T(x_t.astype(np.float32)), T(t.astype(np.float32)),
                             T(inputs["latent_position_ids"]), T(inputs["position_ids"]), T(inputs["attention_mask"]),
                             T(rows))
        return out.asnumpy()

    # ------------------------------------------------------------------ generation
    def _generate(self, contexts, side_hw, num_timesteps, timestep_shift, cfg_text_scale, cfg_img_scale,
                  cfg_interval, cfg_renorm_type, cfg_renorm_min, seed):
        """contexts: {"cond", "text_uncond", "img_uncond"} -> (plan, texts, images) each ending in the noised
        image; returns the decoded image [3, H, W] in [-1, 1]."""
        H, W = side_hw
        h, w = H // self.config.latent_downsample, W // self.config.latent_downsample
        n = h * w
        ppz = self.config.patch_latent_dim
        packed = {}
        for key, (plan, texts, images) in contexts.items():
            _, inputs = self._pack(plan, texts, images + [np.zeros((3, H, W), np.float32)])
            n_lat = len(inputs["latent_rows"])
            x0 = self._clean_latents(inputs, n_lat - n) if n_lat > n else np.zeros_like(inputs["noise"])
            packed[key] = (inputs, n_lat - n, x0)
        x = np.random.default_rng(seed).standard_normal((n, ppz)).astype(np.float32)
        times, dts = flow_timesteps(num_timesteps, timestep_shift)
        self.first_velocity = None

        def v_of(key, t):
            inputs, start, x0 = packed[key]
            x_all = x0.copy()
            x_all[start:start + n] = x
            t_all = np.zeros(len(x_all), np.float32)
            t_all[start:start + n] = t
            return self.velocity(inputs, x_all, t_all)[start:start + n]

        for t, dt in zip(times, dts):
            text_scale = cfg_text_scale if cfg_interval[0] < t <= cfg_interval[1] else 1.0
            img_scale = cfg_img_scale if cfg_interval[0] < t <= cfg_interval[1] else 1.0
            v = v_of("cond", t)
            if self.first_velocity is None:
                self.first_velocity = v.copy()
            if text_scale > 1.0 and "text_uncond" in packed:
                v_text = v_of("text_uncond", t)
                v_img = v_of("img_uncond", t) if img_scale > 1.0 and "img_uncond" in packed else None
                if cfg_renorm_type == "text_channel":
                    v_ = v_text + text_scale * (v - v_text)
                    scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True)
                                    / (np.linalg.norm(v_, axis=-1, keepdims=True) + 1e-8), cfg_renorm_min, 1.0)
                    v_ = v_ * scale
                    v = v_img + img_scale * (v_ - v_img) if v_img is not None else v_
                else:
                    v_ = v_text + text_scale * (v - v_text)
                    if v_img is not None:
                        v_ = v_img + img_scale * (v_ - v_img)
                    if cfg_renorm_type == "global":
                        scale = np.linalg.norm(v) / (np.linalg.norm(v_) + 1e-8)
                    else:
                        scale = np.linalg.norm(v, axis=-1, keepdims=True) / (np.linalg.norm(v_, axis=-1, keepdims=True) + 1e-8)
                    v = v_ * np.clip(scale, cfg_renorm_min, 1.0)
            x = (x - v * dt).astype(np.float32)
        p, z = self.config.latent_patch_size, self.config.vae.z_channels
        latent = x.reshape(h, w, p, p, z).transpose(4, 0, 2, 1, 3).reshape(1, z, h * p, w * p)
        return self._decode(self.ms.Tensor(latent.astype(np.float32))).asnumpy()[0]

    @staticmethod
    def to_pil(image: np.ndarray):
        from PIL import Image

        arr = np.clip((image.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr)

    def text_to_image(self, prompt: str, height: Optional[int] = None, width: Optional[int] = None,
                      num_timesteps: int = 24, timestep_shift: float = 1.0, cfg_text_scale: float = 4.0,
                      cfg_interval=(0.4, 1.0), cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0,
                      seed: int = 0):
        H = height or self.s.budgets.vae_image_size[0]
        W = width or self.s.budgets.vae_image_size[1]
        self._check_side(H, W)
        noise = P._plan("vae_image", loss=1)
        contexts = {"cond": ([P._plan("text"), noise], [self._ids(prompt)], []),
                    "text_uncond": ([noise], [], [])}
        img = self._generate(contexts, (H, W), num_timesteps, timestep_shift, cfg_text_scale, 1.0, cfg_interval,
                             cfg_renorm_type, cfg_renorm_min, seed)
        return self.to_pil(img)

    def edit(self, image, prompt: str, num_timesteps: int = 24, timestep_shift: float = 1.0,
             cfg_text_scale: float = 4.0, cfg_img_scale: float = 2.0, cfg_interval=(0.0, 1.0),
             cfg_renorm_type: str = "text_channel", cfg_renorm_min: float = 0.0, seed: int = 0):
        gen = self._image(image, self.gen_transform)
        vit = self._image(image, self.vit_transform)
        H, W = gen.shape[1:]
        self._check_side(H, W)
        clean, see, noise = P._plan("vae_image"), P._plan("vit_image"), P._plan("vae_image", loss=1)
        contexts = {"cond": ([clean, see, P._plan("text"), noise], [self._ids(prompt)], [gen, vit]),
                    "text_uncond": ([clean, see, noise], [], [gen, vit]),
                    "img_uncond": ([P._plan("text"), noise], [self._ids(prompt)], [])}
        img = self._generate(contexts, (H, W), num_timesteps, timestep_shift, cfg_text_scale, cfg_img_scale,
                             cfg_interval, cfg_renorm_type, cfg_renorm_min, seed)
        return self.to_pil(img)

    def _check_side(self, H, W):
        side = self.s.budgets.vae_image_size
        d = self.config.latent_downsample
        if H % d or W % d or H > side[0] or W > side[1]:
            raise ValueError(f"image size {H}x{W}: must be multiples of {d} and at most {side[0]}x{side[1]}")

    def understand(self, image, question: str, max_new_tokens: int = 32, do_sample: bool = False,
                   temperature: float = 1.0, seed: int = 0) -> str:
        T, b = self.ms.Tensor, self.s.budgets
        vit = self._image(image, self.vit_transform) if image is not None else None
        plan, images = ([P._plan("vit_image")], [vit]) if vit is not None else ([], [])
        plan = plan + [P._plan("text"), P._plan("text")]
        rng = np.random.default_rng(seed)
        answer: List[int] = []
        for _ in range(max_new_tokens):
            batch, inputs = self._pack(plan, [self._ids(question), answer], images)
            last = inputs["row_of_position"][int(batch["sequence_length"]) - 2]   # before the split's eos
            rows = np.full(1, last, np.int32)
            zeros_x = np.zeros_like(inputs["noise"])
            logits = self._logits(*self._common(inputs), T(zeros_x), T(np.zeros(b.max_num_latent_tokens, np.float32)),
                                  T(inputs["latent_position_ids"]), T(inputs["position_ids"]),
                                  T(inputs["attention_mask"]), T(rows)).asnumpy()[0]
            if do_sample:
                prob = np.exp((logits - logits.max()) / max(temperature, 1e-5))
                token = int(rng.choice(len(prob), p=prob / prob.sum()))
            else:
                token = int(np.argmax(logits))
            if token == self.special["eos_token_id"]:
                break
            answer.append(token)
        return self.tokenizer.decode(answer, skip_special_tokens=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ms_mm.models.bagel.infer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("t2i", "edit", "und"):
        s = sub.add_parser(name)
        s.add_argument("--load", required=True, help="MM checkpoint (save dir / converted release) or a release dir")
        s.add_argument("--hf-dir", default=None, help="release dir with llm_config.json, vit_config.json, tokenizer")
        s.add_argument("--ema", action="store_true", help="use the checkpoint's ema/ weights")
        s.add_argument("--max-num-tokens", type=int, default=512)
        s.add_argument("--seed", type=int, default=0)
        if name != "und":
            s.add_argument("--prompt", required=True)
            s.add_argument("--out", required=True)
            s.add_argument("--num-timesteps", type=int, default=24)
            s.add_argument("--timestep-shift", type=float, default=3.0 if name == "t2i" else 3.0)
            s.add_argument("--cfg-text-scale", type=float, default=4.0)
            s.add_argument("--cfg-interval", type=float, nargs=2, default=[0.4, 1.0] if name == "t2i" else [0.0, 1.0])
            s.add_argument("--cfg-renorm-type", default="global" if name == "t2i" else "text_channel",
                           choices=["global", "channel", "text_channel"])
            s.add_argument("--cfg-renorm-min", type=float, default=0.0)
        if name == "t2i":
            s.add_argument("--height", type=int, default=None)
            s.add_argument("--width", type=int, default=None)
        if name == "edit":
            s.add_argument("--cfg-img-scale", type=float, default=2.0)
        if name != "t2i":
            s.add_argument("--image", required=True)
        if name == "und":
            s.add_argument("--question", required=True)
            s.add_argument("--max-new-tokens", type=int, default=32)
            s.add_argument("--do-sample", action="store_true")
            s.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    if getattr(args, "image", None) and not Path(args.image).is_file():
        print(f"error: --image {args.image}: no such file", file=sys.stderr)
        return 2
    try:
        inf = BagelInferencer.from_checkpoint(args.load, args.hf_dir, args.ema, max_num_tokens=args.max_num_tokens)
        if args.task == "t2i":
            img = inf.text_to_image(args.prompt, args.height, args.width, args.num_timesteps, args.timestep_shift,
                                    args.cfg_text_scale, tuple(args.cfg_interval), args.cfg_renorm_type,
                                    args.cfg_renorm_min, args.seed)
        elif args.task == "edit":
            img = inf.edit(args.image, args.prompt, args.num_timesteps, args.timestep_shift, args.cfg_text_scale,
                           args.cfg_img_scale, tuple(args.cfg_interval), args.cfg_renorm_type, args.cfg_renorm_min,
                           args.seed)
        else:
            print(inf.understand(args.image, args.question, args.max_new_tokens, args.do_sample, args.temperature,
                                 args.seed))
            return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    img.save(args.out)
    print(f"wrote {args.out} ({img.size[0]}x{img.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
