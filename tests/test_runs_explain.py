"""A run says what it did and whether it learned: prompt shortage, held-out splits, the learning plot's data,
the closing significance line, did-you-mean for config keys."""

import logging
import math

import pytest

from alignment_core import pipeline
from alignment_core.config import ConfigError, parse_config
from alignment_core.inspect import learning_curves, plot_run
from alignment_core.store import ArtifactStore
from flows.common import significance_line


def _cfg(tmp_path, **data):
    return parse_config({
        "data": {"source": "bundled:prompts", "max_rows": 10, "eval_prompts": 2, **data},
        "generation": {"prompts_per_iteration": 5},
        "store": {"root": str(tmp_path), "run_name": "r"},
    })


def test_prompt_windows_are_disjoint_until_the_source_runs_out_then_reuse_is_announced(tmp_path, caplog):
    cfg = _cfg(tmp_path)  # 10 rows: 8 training prompts, 5 per iteration
    store = ArtifactStore(str(tmp_path))
    caplog.set_level(logging.INFO, logger="alignment_core")
    first = store.read_pandas(pipeline.load_prompts(cfg, 1))
    assert "reusing" not in caplog.text
    second_uri = pipeline.load_prompts(cfg, 2)
    second = store.read_pandas(second_uri)
    held_out = set(store.read_pandas(pipeline.load_eval_prompts(cfg))["prompt_id"])
    assert len(first) == len(second) == 5 and len(held_out) == 2
    assert held_out.isdisjoint(first["prompt_id"]) and held_out.isdisjoint(second["prompt_id"])
    assert len(set(first["prompt_id"]) & set(second["prompt_id"])) == 2  # positions 9, 10 wrap to 1, 2
    assert "iteration 2 asks for prompts 6-10" in caplog.text and "has 8 training prompts" in caplog.text
    manifest = store.read_manifest(second_uri)["extra"]
    assert manifest["reused_prompts"] == 2 and manifest["report"]["rows_kept"] == 10

    never = _cfg(tmp_path / "never", prompt_reuse="never")
    pipeline.load_prompts(never, 1)
    with pytest.raises(ValueError, match="data.prompt_reuse: cycle"):
        pipeline.load_prompts(never, 2)


def test_offline_examples_of_held_out_prompts_are_never_trained_on(tmp_path):
    cfg = parse_config({"setup": "offline_pairwise", "data": {"source": "bundled:preferences", "eval_prompts": 4},
                        "store": {"root": str(tmp_path), "run_name": "r"}})
    store = ArtifactStore(str(tmp_path))
    examples_uri = pipeline.load_examples(cfg)
    train, heldout = (store.read_pandas(examples_uri),
                      store.read_pandas(pipeline.heldout_examples_uri(store, examples_uri)))
    eval_prompts = set(store.read_pandas(pipeline.load_eval_prompts(cfg))["prompt_id"])
    assert set(heldout["prompt_id"]) == eval_prompts and len(eval_prompts) == 4
    assert eval_prompts.isdisjoint(train["prompt_id"])
    assert len(train) + len(heldout) == store.read_manifest(examples_uri)["extra"]["report"]["rows_kept"]


EVALUATIONS = [  # iteration 1's "previous" is the initial policy: the plot's iteration 0
    {"iteration": 1, "annotator_score_mean": 0.4, "annotator_score_mean_previous": 0.1, "oracle_reward_mean": 0.3,
     "oracle_reward_mean_previous": 0.2, "win_rate_vs_initial": 0.7, "win_rate_vs_initial_low": 0.5,
     "win_rate_vs_initial_high": 0.85, "judged_vs_initial": 16.0, "oracle_win_rate_vs_initial": 0.6,
     "oracle_win_rate_vs_initial_low": 0.4, "oracle_win_rate_vs_initial_high": 0.8, "oracle_judged_vs_initial": 16.0},
    {"iteration": 2, "annotator_score_mean": 0.6, "oracle_reward_mean": 0.25, "win_rate_vs_initial": 0.75,
     "win_rate_vs_initial_low": 0.55, "win_rate_vs_initial_high": 0.9, "judged_vs_initial": 16.0,
     "oracle_win_rate_vs_initial": 0.45, "oracle_win_rate_vs_initial_low": 0.25,
     "oracle_win_rate_vs_initial_high": 0.65, "oracle_judged_vs_initial": 16.0},
]


def test_learning_curves_start_at_the_initial_policy_and_name_their_judge():
    curves = learning_curves(list(reversed(EVALUATIONS)), judge="reward model acme/rm", oracle="m:true_reward")
    annotator = curves["rewards"]["annotator score (reward model acme/rm)"]
    assert annotator == {"iterations": [0, 1, 2], "values": [0.1, 0.4, 0.6]}
    assert curves["rewards"]["oracle reward (m:true_reward)"]["values"] == [0.2, 0.3, 0.25]
    by_annotator = curves["win_rates"]["vs initial (judged by reward model acme/rm)"]
    by_oracle = curves["win_rates"]["vs initial (judged by oracle m:true_reward)"]
    assert by_annotator["values"] == [0.7, 0.75] and by_annotator["low"] == [0.5, 0.55]
    # The annotator's win-rate rose while the oracle's fell: both are on the plot, each named.
    assert by_oracle["values"] == [0.6, 0.45] and by_oracle["high"] == [0.8, 0.65]
    assert not any("previous" in label for label in curves["win_rates"])  # not in these summaries


def test_significance_line_reads_the_interval():
    better = {"win_rate_vs_initial": 0.8, "win_rate_vs_initial_low": 0.6, "win_rate_vs_initial_high": 0.9,
              "judged_vs_initial": 32.0}
    assert "significantly better" in significance_line(better) and "32 held-out" in significance_line(better)
    unclear = {**better, "win_rate_vs_initial_low": 0.45}
    assert "not distinguishable" in significance_line(unclear)
    # The oracle, when there is one, is what the line reports.
    oracle = {**better, "oracle_win_rate_vs_initial": 0.3, "oracle_win_rate_vs_initial_low": 0.1,
              "oracle_win_rate_vs_initial_high": 0.45, "oracle_judged_vs_initial": 32.0}
    assert "judged by the oracle" in significance_line(oracle) and "significantly worse" in significance_line(oracle)


def test_plot_is_written_into_the_run_folder(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for evaluation in EVALUATIONS:
        k = evaluation["iteration"]
        summary = {key: value for key, value in evaluation.items() if key != "iteration"}
        rows = [{"step": k, "split": "eval", "metric": key, "value": value} for key, value in summary.items()]
        from alignment_core.records import METRICS, from_rows

        store.write_stage(store.stage_uri("r", k, "evaluation"), "metrics", {"k": k}, [from_rows(rows, METRICS)],
                          extra={"summary": summary, "judge": "rule x", "oracle": "m:f"})
    uri = plot_run(store, "r")
    assert uri == store.uri("r", "evaluation.png") and (tmp_path / "r" / "evaluation.png").stat().st_size > 10_000


def test_config_typos_suggest_the_field():
    with pytest.raises(ConfigError, match=r"training.betta is not a known field; did you mean 'beta'\?"):
        parse_config({"training": {"betta": 0.1}})
    with pytest.raises(ConfigError, match=r"generaton is not a known field; did you mean 'generation'\?"):
        parse_config({"generaton": {}})
    assert math.isclose(parse_config({"training": {"beta": 0.2}}).training.beta, 0.2)


def test_ui_form_describes_every_field_and_which_parameter_wins():
    from prefect.utilities.callables import parameter_schema

    from flows.iterative_dpo import iterative_dpo

    schema = parameter_schema(iterative_dpo.fn).model_dump()
    assert "wins over `config.iterations`" in schema["properties"]["iterations"]["description"]
    assert "wins over `config.store.run_name`" in schema["properties"]["run_name"]["description"]
    undescribed = [f"{name}.{field}" for name, section in schema["definitions"].items()
                   for field, spec in section.get("properties", {}).items() if not spec.get("description")]
    assert undescribed == []


def test_a_released_trainer_lets_its_models_go_and_the_round_records_gpu_memory(tmp_path):
    """One GPU runs the stages in turn: after a round nothing may keep the policy (or the reference) alive."""
    import gc
    import weakref

    from alignment_core.tiny import build_tiny
    from tests.test_training import make_cfg, make_units, run_round

    model_dir = str(build_tiny(tmp_path / "llama2", num_layers=2))
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1)
    store, trainer, _, result = run_round(tmp_path, model_dir, cfg, make_units(8))
    policy = weakref.ref(trainer.accelerator.unwrap_model(trainer.model))
    trainer.release()
    gc.collect()
    assert policy() is None
    extra = store.read_manifest(store.stage_uri("round", 0, "metrics"))["extra"]
    assert "peak_gpu_memory_gib" in extra and result.steps > 0
