"""BAGEL's dry-run synthetic batch (`Family.synthetic_batch`): the global batch's packed samples, in the
train Cell's input order, with the loader's host-side keys, and a finite loss through the tiny model."""
import numpy as np

from ms_mm import registry
from ms_mm.models.bagel.config import BagelConfig
from ms_mm.models.bagel.processing import TRAIN_INPUT_NAMES


def test_synthetic_batch_packs_the_budget_in_input_order():
    family = registry.get("bagel")
    config = BagelConfig.preset("tiny")
    batch = family.synthetic_batch(config, 2, 64)
    assert [k for k in batch if k in TRAIN_INPUT_NAMES] == list(TRAIN_INPUT_NAMES)
    assert batch["token_budget"] == batch["num_real_tokens"] == 2 * 64 == batch["position_ids"].shape[0]
    assert batch["num_samples"] == 2 and batch["padded_images"].shape[0] == 2
    assert batch["num_ce_tokens"] > 0 and batch["num_mse_tokens"] > 0 and batch["vit_pixels"].shape[0] > 0
    # the two samples do not attend to each other (block-diagonal in the packed order)
    rows = batch["row_of_position"]
    allowed = batch["attention_mask"][0, 0] == 0
    first, second = rows[:64], rows[64:]
    assert not allowed[np.ix_(first, second)].any() and not allowed[np.ix_(second, first)].any()
    assert family.count_tokens(batch) == 128


def test_synthetic_batch_runs_through_the_tiny_model():
    import mindspore as ms

    from ms_mm.models.bagel.modeling import BagelForTraining

    config = BagelConfig.preset("tiny")
    batch = registry.get("bagel").synthetic_batch(config, 1, 64)
    cell = BagelForTraining(config)
    loss = cell(*[ms.Tensor(batch[k]) for k in TRAIN_INPUT_NAMES])[0]
    assert np.isfinite(float(loss.asnumpy()))


def test_synthetic_batch_refuses_a_too_short_sequence():
    import pytest

    with pytest.raises(ValueError, match="too short"):
        registry.get("bagel").synthetic_batch(BagelConfig.preset("tiny"), 1, 8)


def test_per_rank_form_stacks_sequences_and_averages_their_losses():
    """The sharded path's global micro batch is the dp ranks' packed sequences stacked on a leading axis
    (`Family.dp_slice`); through the train Cell it gives the mean of the sequences' own losses and the mean
    of their gradients (as data parallel averages its ranks'), every parameter at fp32 noise."""
    import mindspore as ms

    from ms_mm.models.bagel.modeling import BagelForTraining

    family = registry.get("bagel")
    config = BagelConfig.preset("tiny")
    config.vae_sample_posterior = True
    first = family.synthetic_batch(config, 1, 64)
    rng = np.random.default_rng(5)           # a second sequence of the same budgets, other content
    second = dict(first)
    for key in ("vit_pixels", "noise", "posterior_noise", "padded_images"):
        second[key] = rng.standard_normal(first[key].shape).astype(np.float32)
    second["timesteps"] = np.where(first["mse_weights"] > 0, rng.standard_normal(first["timesteps"].shape),
                                   first["timesteps"]).astype(np.float32)
    second["text_ids"] = rng.integers(0, config.llm.vocab_size, first["text_ids"].shape).astype(first["text_ids"].dtype)
    second["ce_labels"] = rng.integers(0, config.llm.vocab_size, first["ce_labels"].shape).astype(
        first["ce_labels"].dtype)
    ranks = [family.dp_slice(b, r, 2, config) for r, b in enumerate((first, second))]
    assert all(ranks[0][k].shape[0] == 1 for k in TRAIN_INPUT_NAMES)
    stacked = {k: np.concatenate([ranks[0][k], ranks[1][k]]) for k in TRAIN_INPUT_NAMES}

    cell = BagelForTraining(config)
    params = cell.trainable_params()
    def forward(*xs):
        return cell(*xs)

    grad_fn = ms.value_and_grad(forward, None, params, has_aux=True)

    def run(batch):
        (loss, ce, mse), grads = grad_fn(*[ms.Tensor(batch[k]) for k in TRAIN_INPUT_NAMES])
        return [float(loss.asnumpy()), float(ce.asnumpy()), float(mse.asnumpy())], [g.asnumpy() for g in grads]

    (la, ga), (lb, gb), (lab, gab) = run(first), run(second), run(stacked)
    assert abs(la[0] - lb[0]) > 1e-3                     # the two sequences differ
    np.testing.assert_allclose(lab, (np.asarray(la) + np.asarray(lb)) / 2, rtol=1e-5, atol=1e-6)
    for p, a, b, ab in zip(params, ga, gb, gab):
        np.testing.assert_allclose(ab, (a + b) / 2, rtol=1e-4, atol=1e-6, err_msg=p.name)


def test_half_precision_reaches_the_decoder_rows():
    """Under --bf16 / --fp16 the ViT and the MoT decoder compute in half precision (on Ascend: flash
    attention, half the activations). The fp32 tables (ViT positions, latent positions, timestep features)
    must not promote the rows back to fp32; checked in fp16, which CPU kernels have."""
    import mindspore as ms

    from ms_mm.models.bagel.modeling import BagelForTraining

    config = BagelConfig.preset("tiny")
    batch = registry.get("bagel").synthetic_batch(config, 1, 64)
    cell = BagelForTraining(config, ms.float16)
    T = lambda k: ms.Tensor(batch[k])[None]          # noqa: E731  (one sequence, the batched form)
    h_und, vit_out = cell.embed_und(T("text_ids"), T("vit_pixels"), T("vit_position_ids"),
                                    ms.Tensor(batch["vit_attention_mask"]))
    x_t = ms.Tensor(np.zeros(batch["noise"].shape, np.float32))[None]
    h_gen = cell.embed_gen(x_t, ms.Tensor(np.full(batch["timesteps"].shape, 0.5, np.float32))[None],
                           T("latent_position_ids"))
    assert h_und.dtype == vit_out.dtype == h_gen.dtype == ms.float16
    assert cell.decode(h_und, h_gen, T("position_ids"), ms.Tensor(batch["attention_mask"])).dtype == ms.float16
