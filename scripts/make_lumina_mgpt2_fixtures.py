"""Extra Lumina-mGPT 2.0 / MoVQGAN parity cases of other tiny shapes, produced by the official code.

Run with a torch CPU environment (never part of the test suite; tests only read the output):

    git --git-dir <Alpha-VLLM/Lumina-mGPT-2.0 mirror> archive f44a4d7f lumina_mgpt/model lumina_mgpt/movqgan \
        | tar -x -C /tmp/lumina_src
    /tmp/torchvenv/bin/python scripts/make_lumina_mgpt2_fixtures.py --src /tmp/lumina_src/lumina_mgpt \
        --out tests/fixtures/lumina_mgpt2_shapes

(torch 2.13.0 CPU, transformers 4.57.1, einops). Decoder cases run `ChameleonXLLMXForConditionalGeneration`
in train() mode with dropout 0, eager attention, loss = c_loss + z_loss_weight * z_loss as xllmx's
finetune.py; the logits come from `ChameleonForConditionalGeneration.forward` on the batch padded
the same way. MoVQGAN cases run the official `MOVQ` (pytorch_lightning.LightningModule stubbed as
nn.Module) in eval(). Each case directory mirrors ../shared/fixtures/lumina_mgpt2/{forward,movqgan}
(same input / output keys) plus a README.md line naming what it varies.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

SEED = 4100

# tiny vocabulary: the real token names, remapped ids (as the main fixture)
def vocabulary(imgimg=0):
    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 96, "<racm3:break>": 97, "<reserved08706>": 106,
          "<reserved08799>": 199}
    vm.update({f"<reserved0{8800 + n}>": 200 + n for n in range(32)})
    vm.update({f"<MOVQGAN{n}>": 256 + n for n in range(64)})
    letters = "ABCDEFGHIJ"
    for i in range(imgimg):  # Chameleon's original image tokens, the ones mask_image_logits hides
        vm["IMGIMG" + "".join(letters[int(c)] for c in str(i)) + "Z"] = 4 + i
    return vm


DECODER_CASES = {
    "lm_swin_mha_mp4": dict(
        why="swin_norm True, MHA (4 heads = 4 kv heads), model_parallel_size 4 (one q/k-norm row per head), "
            "z_loss_weight 1e-3, <pad> tokens inside a sequence (padding_idx row)",
        hf=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, model_parallel_size=4, swin_norm=True, z_loss_weight=1e-3,
                rope_theta=10000.0, mask_image_logits=False), imgimg=0),
    "lm_gqa8x2_mp2_masked": dict(
        why="8 heads / 2 kv heads (head_dim 8), model_parallel_size 2, mask_image_logits True with 8 IMGIMG "
            "tokens, rope_theta 5e5, 3 layers",
        hf=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, model_parallel_size=2, swin_norm=False, z_loss_weight=1e-5,
                rope_theta=500000.0, mask_image_logits=True), imgimg=8),
}

MOVQ_CASES = {
    "movq_mult12": dict(
        why="ch_mult (1, 2) (nin_shortcut convs), 2 res blocks, attention at res 8 in both directions, "
            "z_channels 3 != embed_dim 4, 48 codes, image 16x24 -> codes 8x12",
        ddconfig={"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                  "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.0},
        n_embed=48, embed_dim=4, image_hw=(16, 24)),
}

VQ_TINY = {"embed_dim": 4, "num_embeddings": 64, "double_latent": False, "latent_channels": 4, "resolution": 32,
           "in_channels": 3, "base_channels": 32, "channel_multiplier": [1, 1], "num_res_blocks": 1,
           "attn_resolutions": [], "dropout": 0.0}


def _randomize(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def image_tokens(codes):
    h, w = codes.shape
    rows = [list(map(int, r + 256)) + [199] for r in codes]
    return [97, 200 + h // 4, 200 + w // 4] + [t for r in rows for t in r] + [96]


def make_decoder(src, out, name, case):
    from model import ChameleonXLLMXConfig, ChameleonXLLMXForConditionalGeneration
    from model.chameleon import ChameleonForConditionalGeneration

    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.RandomState(SEED)
    vm = vocabulary(case["imgimg"])
    cfg = ChameleonXLLMXConfig(vocab_size=320, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, dropout=0.0, vocabulary_map=vm, vq_config=VQ_TINY,
                               tie_word_embeddings=False, **case["hf"])
    cfg._attn_implementation = "eager"
    model = ChameleonXLLMXForConditionalGeneration(cfg)
    del model.model.vqmodel
    _randomize(model, gen)
    model.train()

    codes = rng.randint(0, 64, (4, 8))
    prompt = rng.randint(10, 90, 9).tolist()
    seq1 = [0] + prompt + [106] + image_tokens(codes) + [106]
    lab1 = [-100] * (len(prompt) + 2) + image_tokens(codes) + [106]
    q, a = rng.randint(10, 90, 6).tolist(), rng.randint(10, 90, 5).tolist()
    q[2] = a[1] = 1  # <pad> ids inside the text: their embedding row must get no gradient
    seq2 = [0] + q + [106] + a + [106]
    lab2 = [-100] * (len(q) + 2) + a + [106]
    seq3 = [0] + rng.randint(10, 90, 4).tolist() + [106] + [1, 1, 106]
    lab3 = [-100] * 6 + [1, 1, 106]
    seqs, labs = [seq1, seq2, seq3], [lab1, lab2, lab3]

    s = max(map(len, seqs))
    ids = torch.tensor([x + [0] * (s - len(x)) for x in seqs])
    labels = torch.tensor([x + [-100] * (s - len(x)) for x in labs])
    c_loss, extra = model(input_ids=[list(x) for x in seqs], labels=[list(x) for x in labs])
    z_loss = extra["z_loss"][0]
    logits = ChameleonForConditionalGeneration.forward(model, input_ids=ids, labels=labels, use_cache=False)[1]
    loss = c_loss + cfg.z_loss_weight * z_loss
    grad_names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight",
                  "model.layers.1.self_attn.k_norm.bias", "model.layers.1.input_layernorm.weight",
                  "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"]
    params = dict(model.named_parameters())
    outputs = {"logits": logits.detach().numpy(), "c_loss": c_loss.detach().numpy(), "z_loss": z_loss.detach().numpy(),
               "z_loss_weight": np.float32(cfg.z_loss_weight), "loss": loss.detach().numpy()}
    for key, objective in (("grad", loss), ("grad_zloss_only", z_loss)):
        g = torch.autograd.grad(objective, [params[n] for n in grad_names], retain_graph=True)
        outputs.update({f"{key}.{n}": x.numpy() for n, x in zip(grad_names, g)})

    d = out / name
    (d / "hf").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d / "hf", safe_serialization=True)
    np.savez(d / "inputs.npz", input_ids=ids.numpy(), labels=labels.numpy(),
             seq_lens=np.array(list(map(len, seqs)), np.int64), image_codes=codes.astype(np.int64))
    np.savez(d / "outputs.npz", **{k: np.asarray(v, np.float32) for k, v in outputs.items()})
    (d / "sequences.json").write_text(json.dumps({"seqs": seqs, "labels": labs, "image_codes": codes.tolist()}))
    (d / "README.md").write_text(f"# {name}\n\n{case['why']}. Made by scripts/make_lumina_mgpt2_fixtures.py "
                                 f"(official Lumina-mGPT 2.0 code, torch {torch.__version__}, seed {SEED}).\n")


def make_movq(src, out, name, case):
    sys.modules.setdefault("pytorch_lightning", types.SimpleNamespace(LightningModule=torch.nn.Module))
    from movqgan.models.vqgan import MOVQ
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = MOVQ(ddconfig=case["ddconfig"], n_embed=case["n_embed"], embed_dim=case["embed_dim"])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in pname and pname.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.eval()
    h, w = case["image_hw"]
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rng = np.random.RandomState(SEED)
    img = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(3)]) * 0.8
    img = (img + 0.1 * rng.randn(3, h, w)).clip(-1, 1)
    image = torch.tensor(img[None], dtype=torch.float32)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(image))
        zf = z.permute(0, 2, 3, 1).reshape(-1, case["embed_dim"])
        # codebook from z's per-channel statistics so that many codes are used
        book = zf.mean(0) + zf.std(0) * torch.randn(case["n_embed"], case["embed_dim"], generator=gen)
        model.quantize.embedding.weight.copy_(book)
        z_q, emb_loss, info = model.encode(image)
        codes = info[2].reshape(-1)
        d2 = ((zf[:, None, :] - book[None]) ** 2).sum(-1).sort(-1).values
        gap = float(((d2[:, 1] - d2[:, 0]) / zf.var()).min())
        f = 2 ** (len(case["ddconfig"]["ch_mult"]) - 1)
        decoded = model.decode_code(codes[None], h // f, w // f)
        decoded_q = model.decode(z_q)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "movqgan.safetensors"))
    (d / "movqgan_config.json").write_text(json.dumps({"ddconfig": case["ddconfig"], "n_embed": case["n_embed"],
                                                       "embed_dim": case["embed_dim"], "beta": 0.25, "legacy": True,
                                                       "remap": None, "sane_index_shape": False}, indent=2))
    np.savez(d / "inputs.npz", image=image.numpy())
    np.savez(d / "outputs.npz", codes=codes.numpy().astype(np.int64),
             codes_hw=codes.numpy().astype(np.int64).reshape(h // f, w // f), z_pre_quant=z.numpy(),
             z_q=z_q.numpy(), emb_loss=emb_loss.numpy(), decoded=decoded.numpy(), decoded_from_quant=decoded_q.numpy())
    (d / "README.md").write_text(f"# {name}\n\n{case['why']}. Made by scripts/make_lumina_mgpt2_fixtures.py "
                                 f"(official MOVQ, eval(), torch {torch.__version__}, seed {SEED}); {len(set(codes.tolist()))} "
                                 f"distinct codes; min (2nd-best - best) squared distance / var(z) = {gap:.3g}.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="lumina_mgpt/ of the official repo (holds model/ and movqgan/)")
    ap.add_argument("--out", default="tests/fixtures/lumina_mgpt2_shapes")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    for name, case in DECODER_CASES.items():
        make_decoder(args.src, out, name, case)
    for name, case in MOVQ_CASES.items():
        make_movq(args.src, out, name, case)
    print(f"wrote {len(DECODER_CASES) + len(MOVQ_CASES)} cases under {out}")


if __name__ == "__main__":
    main()
