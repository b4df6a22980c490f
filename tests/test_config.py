import math
import typing
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from pydantic import BaseModel

from alignment_core.config import ConfigError, PipelineConfig, dump_config, load_config, parse_config, yaml_load_unique
from alignment_core.records import EXAMPLES, METRICS, SchemaError, conform, from_rows

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_defaults_run_the_tiny_setup():
    cfg = PipelineConfig()
    assert cfg.model.policy == "tiny://llama" and cfg.online and cfg.store.root == "./runs"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"training": {"beta": -1}}, "training.beta must be > 0, got -1"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p must be <= 1, got 1.5"),
        ({"training": {"loss": "ppo"}}, "training.loss: Input should be"),
        ({"trainig": {}}, "trainig is not a known field"),
        ({"annotation": {"judge": {"timeout": 3}}}, "annotation.judge.timeout is not a known field"),
        ({"generation": {"n_samples": "four"}}, "generation.n_samples: Input should be a valid integer"),
        ({"training": {"max_prompt_length": 300, "max_length": 256}}, "max_prompt_length (300) must be < max_length"),
        ({"setup": "online"}, "setup: Input should be 'sft'"),
        ({"setup": "sft", "training": {"loss": "dpo"}}, "training.loss 'dpo' does not fit setup 'sft'"),
        ({"annotation": {"annotator": "reward_model"}}, "annotation.reward_model must name a reward model"),
        ({"annotation": {"annotator": "judge_pairwise"}}, "annotation.judge.model must name the judge model"),
        ({"annotation": {"annotator": "judge_pairwise", "judge": {"backend": "http", "model": "m"}}},
         "annotation.judge.base_url and annotation.judge.model are needed"),
        ({"reweight": {"strategy": "importance"}}, "reweight.behaviour_model must name the model"),
    ],
)
def test_bad_values_fail_naming_the_field(data, message):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(parse_config({"training": {"beta": 0.3}})))
    cfg = load_config(path, overrides={"training.learning_rate": 1e-3, "store.run_name": "x"})
    assert (cfg.training.beta, cfg.training.learning_rate, cfg.store.run_name) == (0.3, 1e-3, "x")
    path.write_text(yaml.safe_dump(["not", "a", "mapping"]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_stage_hash_tracks_only_its_sections():
    base, changed = PipelineConfig(), parse_config({"training": {"beta": 0.5}})
    assert base.stage_hash("generation") == changed.stage_hash("generation")
    assert base.stage_hash("training") != changed.stage_hash("training")


def test_conform_names_the_column():
    with pytest.raises(SchemaError, match="missing required column 'example_id'"):
        conform(pa.table({"prompt": ["p"]}), EXAMPLES, "examples")
    with pytest.raises(SchemaError, match="column 'value' has 1 null values"):
        from_rows([{"step": 0, "split": "train", "metric": "loss", "value": None}], METRICS)
    table = from_rows([{"value": 1, "metric": "loss", "split": "train", "step": 3}], METRICS)
    assert table.schema == METRICS and table.column_names == METRICS.names


# --- YAML: duplicate keys --------------------------------------------------------------------------------------


def test_duplicate_yaml_keys_fail_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  beta: 0.1\n  loss: dpo\n  beta: 0.5\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'beta' \(first at line 2\)[\s\S]*line 4"):
        load_config(path)
    path.write_text("training: {beta: 0.1}\ntraining: {beta: 0.2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'training'"):
        load_config(path)
    # The same key in two mappings is no duplicate; a merge key's values may be overridden (as
    # deployments/prefect.yaml does).
    path.write_text("training: {seed: 1}\ngeneration: {seed: 1}\n")
    assert load_config(path).generation.seed == 1
    text = "base: &base {beta: 0.1, loss: dpo}\ncfg:\n  training:\n    <<: *base\n    beta: 0.3\n"
    assert yaml_load_unique(text)["cfg"]["training"] == {"beta": 0.3, "loss": "dpo"}


# --- inf / nan ------------------------------------------------------------------------------------------------


def _float_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Dotted paths of every float field of a config model, through its nested sections."""
    paths = []
    for name, info in model.model_fields.items():
        candidates = [info.annotation, *typing.get_args(info.annotation)]
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for section in sections:
            paths += _float_fields(section, (*prefix, name))
        if float in candidates:
            paths.append((*prefix, name))
    return paths


FLOAT_FIELDS = _float_fields(PipelineConfig)


def _json_schema_numbers(node: dict, definitions: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """The same paths read from the JSON schema (what the UI's form shows): properties of type number."""
    paths = []
    for name, prop in node.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        for option in options:
            ref = option.get("$ref") or (option.get("allOf") or [{}])[0].get("$ref")
            if ref:
                paths += _json_schema_numbers(definitions[ref.rsplit("/", 1)[-1]], definitions, (*prefix, name))
        if any(option.get("type") == "number" for option in options):
            paths.append((*prefix, name))
    return paths


def test_the_walk_finds_every_number_of_the_schema():
    schema = PipelineConfig.model_json_schema()
    assert set(FLOAT_FIELDS) == set(_json_schema_numbers(schema, schema["$defs"]))
    assert {("training", "beta"), ("reweight", "clip"), ("annotation", "pointwise_threshold"),
            ("model", "adapter", "alpha"), ("store", "lease_timeout_s")} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", FLOAT_FIELDS, ids=".".join)
def test_no_float_field_accepts_inf_or_nan(path, value):
    data: dict = {}
    section = data
    for name in path[:-1]:
        section = section.setdefault(name, {})
    section[path[-1]] = value
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert f"{'.'.join(path)}: Input should be a finite number" in str(error.value)


def test_yaml_inf_and_nan_fail_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: {beta: .inf}\nreweight: {temperature: .nan}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert {"training.beta: Input should be a finite number, got inf",
            "reweight.temperature: Input should be a finite number, got nan"} <= set(str(error.value).splitlines())


# --- cross-field rules at config load -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"reweight": {"clip": 0.5}}, "reweight.clip: clip must be >= 1 (weights are clipped to [1/clip, clip])"),
        ({"generation": {"n_samples": 1}}, "generation.n_samples must be >= 2 for setup 'online_pairwise'"),
        ({"setup": "rl", "training": {"loss": "rl"}, "generation": {"n_samples": 1}},
         "generation.n_samples must be >= 2 for setup 'rl' (rl's leave-one-out baseline"),
        ({"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1}},
         "pointwise labels by the per-prompt median need two samples"),
        ({"generation": {"max_new_tokens": 512, "max_model_len": 512}},
         "generation.max_new_tokens (512) must be < generation.max_model_len (512)"),
        ({"evaluation": {"max_new_tokens": 600}}, "evaluation.max_new_tokens (600) must be < generation.max_model_len"),
        ({"training": {"max_prompt_length": 300, "max_length": 256}}, "max_prompt_length (300) must be < max_length"),
        ({"setup": "rl", "training": {"loss": "rl"}, "annotation": {"annotator": "judge_pairwise",
                                                                    "judge": {"model": "m"}}},
         "annotation.annotator 'judge_pairwise' gives preference pairs, but setup 'rl' needs rewards"),
        ({"setup": "online_pointwise", "training": {"loss": "kto", "batch_size": 1},
          "annotation": {"pointwise_threshold": 0.5}}, "loss 'kto' needs batch_size >= 2"),
        ({"training": {"loss": "simpo", "chosen_nll_weight": 1.0}},
         "training.chosen_nll_weight applies to the losses ('dpo', 'cdpo', 'ipo'), not 'simpo'"),
        ({"training": {"loss": "slic", "chosen_nll_weight": 1.0}}, "not 'slic' (it has slic_nll_weight)"),
        ({"data": {"source": "bundled:prompts", "split": "test"}},
         "data source 'bundled:prompts' is a single file: split/subset/revision apply only to hub datasets"),
        ({"data": {"source": "org/dataset", "split": "train_prefs", "eval_source": "held_out.jsonl"}},
         "data source 'held_out.jsonl' is a single file"),
        ({"setup": "offline_pairwise", "data": {"format": "prompt_only"}},
         "data.format 'prompt_only' gives no examples setup 'offline_pairwise' can train on"),
        ({"setup": "offline_pointwise", "training": {"loss": "kto"}, "data": {"format": "pairs"}},
         "data.format 'pairs' gives no examples setup 'offline_pointwise' can train on"),
    ],
)
def test_cross_field_rules_fail_at_config_load(data, message):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "data",
    [
        {"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1},
         "annotation": {"pointwise_threshold": 0.5}},
        {"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1},
         "annotation": {"annotator": "judge_pointwise", "judge": {"model": "m"}}},  # yes/no: threshold 0.5
        {"evaluation": {"enabled": False, "max_new_tokens": 600}},
        {"setup": "offline_pairwise", "generation": {"n_samples": 1}},  # offline: no sampling of pairs
        {"setup": "sft", "training": {"loss": "sft"}, "data": {"format": "pairs"}},
        {"data": {"source": "org/dataset", "split": "train_prefs", "eval_source": "org/held_out"}},
        {"setup": "offline_pairwise", "annotation": {"annotator": "judge_pairwise", "judge": {"model": "m"}}},
    ],
)
def test_cross_field_rules_accept_what_works(data):
    assert isinstance(parse_config(data), PipelineConfig)


def test_the_late_checks_share_the_config_rules():
    from alignment_core.batches import BatchFactory
    from alignment_core.config import ReweightConfig
    from alignment_core.reweight import SampleReweighter

    unvalidated = ReweightConfig().model_copy(update={"clip": 0.5})  # model_copy skips validation
    with pytest.raises(ValueError, match=r"clip must be >= 1 \(weights are clipped"):
        SampleReweighter(unvalidated)
    with pytest.raises(ValueError, match=r"max_prompt_length \(64\) must be < max_length \(64\)"):
        BatchFactory(object(), "sft", max_length=64, max_prompt_length=64)
