"""The annotator cascade: a reward-model ensemble labels every pair, the pairs it is least sure of go to the
true reward (an oracle) under a budget that is never exceeded, resumes included."""

import json
import math

import pandas as pd
import pytest

from alignment_core.annotation.base import ScoreRules
from alignment_core.annotation.cascade import CascadeAnnotator, uncertainty
from alignment_core.annotation.scorers import ProgrammaticAnnotator, RewardModelEnsemble
from alignment_core.annotation.stage import make_annotator, run_annotation, shards_by_prompt
from alignment_core.config import ConfigError, PipelineConfig, parse_config
from alignment_core.evaluation import annotator_label
from alignment_core.rewards import positive_words
from alignment_core.store import ArtifactStore
from tests.test_annotation import make_generations, write_generations
from tests.test_ensemble import members  # noqa: F401 (the fixture: three tiny reward models)

ORACLE = "programmatic:alignment_core.rewards:positive_words"
SAMPLES = ["a good happy day", "bad cold rain", "a kind and wonderful friend", "the worst sad night",
           "ok", "a great bright morning"]


def generations(prompts: int, samples: int = 4) -> pd.DataFrame:
    return make_generations({f"p{i}": [SAMPLES[(i + k) % len(SAMPLES)] for k in range(samples)]
                             for i in range(prompts)})


def cascade_config(models, **cascade) -> PipelineConfig:
    return parse_config({
        "setup": "online_pairwise",
        "generation": {"prompts_per_iteration": 6, "shard_size": 2, "n_samples": 4},
        "annotation": {"annotator": "cascade", "reward_model": models,
                       "cascade": {"first": "reward_model", "escalate_to": "programmatic", **cascade}},
    })


def escalated(rows) -> list[dict]:
    return [r for r in rows if json.loads(r["raw"])["cascade"]["escalated"]]


def test_the_most_uncertain_pairs_go_to_the_oracle(members):  # noqa: F811
    frame = generations(6)
    first = RewardModelEnsemble(members, ScoreRules())
    cascade = CascadeAnnotator(first, ProgrammaticAnnotator("alignment_core.rewards:positive_words", ScoreRules()),
                               budget=0.5, prompts_per_iteration=6)
    rows = cascade.annotate(frame)
    cheap = first.annotate(frame)
    assert len(rows) == len(cheap) == 6  # one pair per prompt, whoever labelled it
    up = escalated(rows)
    assert len(up) == 3 and all(r["annotator"] == ORACLE for r in up)
    # The three the ensemble is likeliest to have wrong, most uncertain first.
    ranked = sorted(cheap, key=uncertainty, reverse=True)
    assert [r["prompt_id"] for r in up] == [r["prompt_id"] for r in cheap if r in ranked[:3]]
    records = [json.loads(r["raw"])["cascade"] for r in up]
    assert sorted(rec["rank"] for rec in records) == [0, 1, 2]
    assert all(rec["replaced"]["annotator"] == first.name and rec["quota"] == 3 for rec in records)
    # The oracle labels the same two samples the ensemble had picked, in its own order.
    by_id = frame.set_index("generation_id")["response"]
    for row, rec in zip(up, records, strict=True):
        assert {row["generation1_id"], row["generation2_id"]} == {rec["replaced"]["generation1_id"],
                                                                   rec["replaced"]["generation2_id"]}
        assert positive_words("", by_id[row["generation1_id"]]) >= positive_words("", by_id[row["generation2_id"]])
    kept = [r for r in rows if r not in up]
    assert all(r["annotator"] == first.name for r in kept)


def _pair_row(prompt: str, margins: list[float] | None = None, scores: tuple | None = None, status: str = "ok"):
    """A first annotator's row for prompt's pair: an ensemble's (members' margins) or one model's (scores)."""
    raw = {} if margins is None else {"members": {f"{prompt}-a": margins, f"{prompt}-b": [0.0] * len(margins)}}
    score1, score2 = scores or (None, None)
    return {"prompt_id": prompt, "annotation_id": prompt, "status": status, "raw": json.dumps(raw),
            "generation1_id": f"{prompt}-a", "generation2_id": f"{prompt}-b", "score1": score1, "score2": score2}


def test_escalation_ranks_by_the_chance_that_the_label_is_wrong():
    """Not by the members' spread alone: it grows with the margin, so it would send up the surest pairs."""
    rows = [
        _pair_row("sure", margins=[6.0, 7.0, 8.0]),  # spread 0.82, mean 7: certain
        _pair_row("close", margins=[0.3, -0.2, 0.5]),  # spread 0.29, mean 0.2: a coin flip
        _pair_row("split", margins=[2.0, -1.0, 2.0]),  # spread 1.41, mean 1: the members disagree
        _pair_row("one-model-close", scores=(0.1, 0.0)),
        _pair_row("one-model-far", scores=(3.0, 0.0)),
        _pair_row("failed", status="error"),
    ]
    assert uncertainty(rows[1]) == pytest.approx(1 - 1 / (1 + math.exp(-0.2 / math.sqrt(1 + math.pi * 0.0867 / 8))),
                                                 rel=1e-3)
    oracle = ProgrammaticAnnotator("alignment_core.rewards:positive_words", ScoreRules())
    cascade = CascadeAnnotator(first=oracle, escalate_to=oracle, budget=0.5, prompts_per_iteration=6)
    order = [rows[i]["prompt_id"] for i in cascade._ranked(rows)]
    assert order == ["failed", "one-model-close", "close", "split", "one-model-far", "sure"]


def test_random_escalation_is_a_control_of_the_same_size(members):  # noqa: F811
    frame = generations(6)
    first = RewardModelEnsemble(members, ScoreRules())
    oracle = ProgrammaticAnnotator("alignment_core.rewards:positive_words", ScoreRules())
    chosen = {tuple(sorted(r["prompt_id"] for r in escalated(
        CascadeAnnotator(first, oracle, 0.5, 6, rule="random", seed=seed).annotate(frame)))) for seed in range(6)}
    assert all(len(c) == 3 for c in chosen) and len(chosen) > 1  # seeds choose differently, always 3


@pytest.mark.parametrize("budget, expected", [(0.5, [1, 1, 1]), (2, [0, 1, 1]), (0.2, [0, 0, 1]), (6, [2, 2, 2])])
def test_shard_quotas_add_up_to_the_budget(budget, expected):
    rule = ProgrammaticAnnotator("alignment_core.rewards:positive_words", ScoreRules())
    cascade = CascadeAnnotator(rule, rule, budget, prompts_per_iteration=6)
    assert [cascade.quota(2, before) for before in (0, 2, 4)] == expected  # three shards of two prompts


def test_the_stage_spends_the_budget_once_across_a_resume(members, tmp_path):  # noqa: F811
    store = ArtifactStore(str(tmp_path))
    frame = generations(6)
    generations_uri = write_generations(store, frame)
    cfg = cascade_config(members, budget=2)  # 2 of 6 prompts: shards of 2 prompts spend 0, 1, 1
    out = store.stage_uri("run", 0, "annotations")
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    extra = manifest["extra"]
    assert extra["escalated"] == 2 and extra["rows_by_annotator"][ORACLE] == 2
    assert sum(extra["rows_by_annotator"].values()) == 6
    whole = store.read_pandas(out).sort_values("annotation_id", ignore_index=True)
    # Each shard escalated its own most uncertain pair(s).
    first = RewardModelEnsemble(members, ScoreRules())
    for index, shard in enumerate(shards_by_prompt(frame, 2)):
        quota = [0, 1, 1][index]
        cheap = sorted(first.annotate(shard), key=uncertainty, reverse=True)
        went_up = set(whole.loc[whole["annotator"] == ORACLE, "prompt_id"]) & set(shard["prompt_id"])
        assert went_up == {r["prompt_id"] for r in cheap[:quota]}

    # Killed after its first shard: the later shards and the manifest are not there; the rerun spends on them
    # exactly what the whole run did, and the rows are the same.
    stage = tmp_path / "run/iter-000/annotations"
    for name in ("_manifest.json", "part-00001.parquet", "part-00002.parquet"):
        (stage / name).unlink()
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert manifest["extra"]["escalated"] == 2
    pd.testing.assert_frame_equal(store.read_pandas(out).sort_values("annotation_id", ignore_index=True), whole)


def test_config_checks_and_evaluation_uses_the_expensive_annotator(members):  # noqa: F811
    cfg = cascade_config(members, budget=0.25)
    annotator = make_annotator(cfg)
    assert isinstance(annotator, CascadeAnnotator) and isinstance(annotator.first, RewardModelEnsemble)
    assert annotator.budget == 0.25 and annotator.name.endswith(">" + ORACLE)
    assert annotator_label(cfg) == "rule alignment_core.rewards:positive_words"
    with pytest.raises(ConfigError, match="a cascade needs two annotators"):
        cascade_config(members, escalate_to="reward_model")
    with pytest.raises(ConfigError, match="a number of pairs"):
        cascade_config(members, budget=2.5)
    with pytest.raises(ConfigError, match="gives preference pairs"):
        parse_config({"setup": "rl", "training": {"loss": "rl"},
                      "annotation": {"annotator": "cascade", "reward_model": members}})
    with pytest.raises(ConfigError, match="must name a reward model"):
        parse_config({"setup": "online_pairwise", "annotation": {"annotator": "cascade"}})
