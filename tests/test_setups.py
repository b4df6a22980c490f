"""The two tables every other module reads: `setups.SETUPS` (one row per learning setup) and `losses.LOSSES`
(one row per loss). They must agree with each other and with what the config accepts."""

from typing import get_args

import pytest

from alignment_core import losses
from alignment_core.annotation.base import output_mode
from alignment_core.batches import BatchFactory
from alignment_core.config import Loss, Setup, parse_config
from alignment_core.models import load_tokenizer
from alignment_core.setups import SETUPS, setup_spec, setups_of_flow


def test_every_loss_a_setup_names_has_a_row_and_every_row_a_setup():
    named = {loss for spec in SETUPS.values() for loss in spec.losses}
    assert named == set(losses.LOSSES) == set(get_args(Loss))
    assert set(get_args(Setup)) == set(SETUPS)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_setups_losses_take_as_many_responses_as_its_units_hold(setup):
    spec = SETUPS[setup]
    for loss in spec.losses:
        assert losses.LOSSES[loss].responses == spec.responses, (setup, loss)
    # reward models are trained by the reward setup alone; per-prompt groups come with rewards per sample
    assert all(losses.LOSSES[loss].reward_head == (setup == "reward_modelling") for loss in spec.losses)
    assert all(not losses.LOSSES[loss].grouped or spec.feedback == "reward" for loss in spec.losses)


def test_the_flows_split_the_setups_between_them():
    flows = {spec.flow for spec in SETUPS.values()}
    assert sorted(flows) == ["iterative-dpo", "offline-preference", "reward-model", "sft"]
    assert sorted(name for flow in flows for name in setups_of_flow(flow)) == sorted(SETUPS)
    assert setups_of_flow("iterative-dpo") == tuple(name for name, spec in SETUPS.items() if spec.online)


def test_config_batches_and_annotation_read_the_table(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for name, spec in SETUPS.items():
        assert BatchFactory(tokenizer, name, max_length=64, max_prompt_length=32).generations == spec.generations
        if spec.online:
            assert output_mode(name) == {"preference": "pairs", "label": "labels", "reward": "rewards"}[spec.feedback]
        for loss in losses.LOSSES:
            fits = loss in spec.losses
            config = {"setup": name, "training": {"loss": loss}}
            if fits:
                assert parse_config(config).training.loss == loss
            else:
                with pytest.raises(ValueError, match="does not fit setup"):
                    parse_config(config)
    with pytest.raises(ValueError, match="unknown setup 'dpo'"):
        setup_spec("dpo")
