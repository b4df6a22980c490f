from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from alignment_core.config import ConfigError, PipelineConfig, dump_config, load_config, parse_config
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
