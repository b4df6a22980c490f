"""Config strictness: every range bound at and past its edge, numbers that are strings, run names.

BOUNDS is the expected range of every bounded field, written out: a bound loosened or dropped in the config (or a
new bounded field not listed here) fails `test_the_bounds_are_the_expected_ones`, and each bound is then tried
through parse_config at its edge (accepted) and just past it (refused with a message naming the field).
"""

import argparse

import annotated_types
import pytest
from pydantic import BaseModel

from alignment_core.config import ConfigError, PipelineConfig, load_config, parse_config
from flows.common import config_from_cli

MAX_TOKENS, MAX_BATCH, MAX_COUNT = 1 << 20, 1 << 16, 1 << 24
BOUNDS = {
    "iterations": {"gt": 0, "le": 10_000},
    "data.max_rows": {"gt": 0, "le": 1 << 31},
    "data.eval_prompts": {"ge": 0, "le": MAX_COUNT},
    "data.min_pair_margin": {"ge": 0},
    "model.adapter.r": {"gt": 0, "le": 4096},
    "model.adapter.alpha": {"gt": 0},
    "model.adapter.dropout": {"ge": 0, "lt": 1},
    "generation.prompts_per_iteration": {"gt": 0, "le": MAX_COUNT},
    "generation.n_samples": {"gt": 0, "le": 1024},
    "generation.temperature": {"ge": 0},
    "generation.top_p": {"gt": 0, "le": 1},
    "generation.max_new_tokens": {"gt": 0, "le": MAX_TOKENS},
    "generation.batch_size": {"gt": 0, "le": MAX_BATCH},
    "generation.shard_size": {"gt": 0, "le": MAX_BATCH},
    "generation.tensor_parallel_size": {"gt": 0, "le": 1024},
    "generation.data_parallel_size": {"gt": 0, "le": 1024},
    "generation.gpu_memory_utilization": {"gt": 0, "le": 1},
    "generation.max_model_len": {"gt": 0, "le": MAX_TOKENS},
    "annotation.ensemble_penalty": {"ge": 0},
    "annotation.max_disagreement": {"gt": 0},
    "annotation.min_margin": {"ge": 0},
    "annotation.batch_size": {"gt": 0, "le": MAX_BATCH},
    "annotation.max_failure_fraction": {"ge": 0, "le": 1},
    "annotation.judge.timeout_s": {"gt": 0},
    "annotation.judge.budget_s": {"gt": 0},
    "annotation.judge.max_retries": {"ge": 0},
    "annotation.judge.concurrency": {"gt": 0},
    "annotation.judge.max_new_tokens": {"gt": 0},
    "annotation.cascade.budget": {"gt": 0},
    "annotation.human.timeout_s": {"gt": 0},
    "model.torch_threads": {"gt": 0, "le": 1024},
    "annotation.cascade.refresh.learning_rate": {"gt": 0},
    "annotation.cascade.refresh.epochs": {"gt": 0, "le": 1000},
    "annotation.cascade.refresh.batch_size": {"gt": 0, "le": 65536},
    "annotation.human.max_pairs_per_form": {"gt": 0, "le": 256},
    "reweight.temperature": {"gt": 0},
    "reweight.clip": {"gt": 0},
    "reweight.min_effective_sample_fraction": {"ge": 0, "le": 1},
    "training.beta": {"gt": 0},
    "training.label_smoothing": {"ge": 0, "lt": 0.5},
    "training.reward_margin": {"ge": 0},
    "training.slic_margin": {"ge": 0},
    "training.simpo_gamma": {"ge": 0},
    "training.slic_nll_weight": {"ge": 0},
    "training.chosen_nll_weight": {"ge": 0},
    "training.kto_desirable_weight": {"gt": 0},
    "training.kto_undesirable_weight": {"gt": 0},
    "training.rl_kl_coef": {"ge": 0},
    "training.learning_rate": {"gt": 0},
    "training.weight_decay": {"ge": 0},
    "training.epochs": {"gt": 0, "le": 1000},
    "training.batch_size": {"gt": 0, "le": MAX_BATCH},
    "training.gradient_accumulation_steps": {"gt": 0, "le": MAX_BATCH},
    "training.warmup_ratio": {"ge": 0, "lt": 1},
    "training.max_grad_norm": {"gt": 0},
    "training.rows_per_forward": {"ge": 0, "le": MAX_BATCH},
    "training.max_length": {"gt": 0, "le": MAX_TOKENS},
    "training.max_prompt_length": {"gt": 0, "le": MAX_TOKENS},
    "training.save_every_steps": {"ge": 0, "le": MAX_COUNT},
    "training.num_processes": {"gt": 0, "le": 4096},
    "evaluation.max_new_tokens": {"gt": 0, "le": MAX_TOKENS},
    "evaluation.temperature": {"ge": 0},
    "store.lease_timeout_s": {"gt": 0},
    "scale_out.timeout_s": {"gt": 0},
    "scale_out.stage_deadline_s": {"gt": 0},
    "scale_out.generate_workers": {"gt": 0, "le": 1024},
    "scale_out.annotate_workers": {"gt": 0, "le": 1024},
    "scale_out.max_redispatches": {"ge": 0},
    "scale_out.max_staleness": {"ge": 1, "le": 64},
}
OPERATORS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def bounded_fields(model: type[BaseModel] = PipelineConfig, prefix: str = ""):
    """(dotted name, field info) of every field with a range bound, walking the config's sections."""
    for name, info in model.model_fields.items():
        candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is not None:
            yield from bounded_fields(section, f"{prefix}{name}.")
        elif any(isinstance(m, annotated_types.BaseMetadata) for m in info.metadata):
            yield f"{prefix}{name}", info


def bounds_of(info) -> dict:
    return {kind: getattr(m, kind) for m in info.metadata for kind in OPERATORS if getattr(m, kind, None) is not None}


FIELDS = dict(bounded_fields())


def test_the_bounds_are_the_expected_ones():
    assert {name: bounds_of(info) for name, info in FIELDS.items()} == BOUNDS


def nested(dotted: str, value) -> dict:
    *sections, leaf = dotted.split(".")
    data = {leaf: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def bound_error(dotted: str, value) -> str | None:
    """The message refusing `value` for its range, or None when the range takes it (other rules may still not)."""
    try:
        parse_config(nested(dotted, value))
    except ConfigError as error:
        lines = [line for line in str(error).splitlines() if line.startswith(f"{dotted} must be ")]
        return lines[0] if lines else None
    return None


@pytest.mark.parametrize("dotted", BOUNDS)
def test_each_bound_at_and_past_its_edge(dotted):
    is_int = FIELDS[dotted].annotation in (int, int | None)
    for kind, bound in BOUNDS[dotted].items():
        step = 1 if is_int else max(1e-6, abs(bound) * 1e-6)
        inside, outside = {"gt": (bound + step, bound), "ge": (bound, bound - step),
                           "lt": (bound - step, bound), "le": (bound, bound + step)}[kind]
        assert bound_error(dotted, inside) is None, f"{dotted}={inside} refused"
        shown = int(bound) if float(bound).is_integer() else bound
        assert bound_error(dotted, outside) == f"{dotted} must be {OPERATORS[kind]} {shown}, got {outside!r}"


@pytest.mark.parametrize(("dotted", "text", "expected"), [
    ("training.learning_rate", "1e-4", "a number"),
    ("training.beta", "0.1", "a number"),
    ("training.epochs", "2", "an integer"),
    ("training.max_length", "256", "an integer"),
    ("training.gradient_checkpointing", "yes", "true or false"),
    ("evaluation.enabled", "true", "true or false"),
])
def test_a_number_or_bool_given_as_a_string_is_refused_naming_the_field(dotted, text, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(nested(dotted, text))
    assert f"{dotted} must be {expected}, got the string {text!r} (write it without quotes)" in str(error.value)


def test_other_strictness_edges():
    assert parse_config(nested("training.learning_rate", 1)).training.learning_rate == 1.0  # an int is a number
    with pytest.raises(ConfigError, match="training.epochs"):
        parse_config(nested("training.epochs", 2.5))
    with pytest.raises(ConfigError, match="training.gradient_checkpointing"):
        parse_config(nested("training.gradient_checkpointing", 1))


def test_yaml_reads_exponent_floats_as_numbers_and_quoted_ones_as_strings(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("training:\n  learning_rate: 1e-4\n  beta: 5E-1\n  weight_decay: +2e0\n  epochs: 3\n")
    training = load_config(config).training
    assert (training.learning_rate, training.beta, training.weight_decay, training.epochs) == (1e-4, 0.5, 2.0, 3)
    assert isinstance(training.epochs, int)
    config.write_text("training:\n  learning_rate: '1e-4'\n")
    with pytest.raises(ConfigError, match=r"training.learning_rate must be a number, got the string '1e-4'"):
        load_config(config)


def test_command_line_overrides_read_exponent_floats(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("setup: sft\ntraining:\n  loss: sft\n")
    args = argparse.Namespace(config=str(config), set=["training.learning_rate=3e-5", "training.epochs=2"],
                              iterations=None, run_name=None, store_root=None, force=False)
    training = config_from_cli(args).training
    assert (training.learning_rate, training.epochs) == (3e-5, 2)


@pytest.mark.parametrize("name", [" ", "  tiny", "tiny ", "a b", "tab\there", "new\nline", "quote'd", "star*",
                                  "semi;colon", "dollar$", "é", "x" * 129])
def test_blank_or_path_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="store.run_name"):
        parse_config({"store": {"run_name": name}})


@pytest.mark.parametrize("name", ["x" * 128, "A-1.b_2", "9lives"])
def test_portable_run_names_up_to_128_characters_load(name):
    assert parse_config({"store": {"run_name": name}}).store.run_name == name


def test_the_prompt_leaves_room_for_a_response_and_clips_are_at_least_one():
    assert parse_config({"training": {"max_length": 64, "max_prompt_length": 63}}).training.max_prompt_length == 63
    with pytest.raises(ConfigError, match=r"max_prompt_length \(64\) must be < max_length \(64\)"):
        parse_config({"training": {"max_length": 64, "max_prompt_length": 64}})
    assert parse_config({"reweight": {"clip": 1.0}}).reweight.clip == 1.0
    with pytest.raises(ConfigError, match="clip must be >= 1"):
        parse_config({"reweight": {"clip": 0.99}})
