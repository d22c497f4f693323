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
