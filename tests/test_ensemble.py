"""A reward-model ensemble: every member's score recorded, a conservative score, and abstention where the
members disagree."""

import json

import numpy as np
import pytest

from alignment_core.annotation.base import ScoreRules
from alignment_core.annotation.scorers import RewardModelAnnotator, RewardModelEnsemble
from alignment_core.annotation.stage import make_annotator
from alignment_core.config import ConfigError, parse_config
from alignment_core.pipeline import annotator_models
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from tests.test_annotation import make_generations

RESPONSES = {
    "p1": ["a good day", "bad", "a wonderful and kind answer", "the cold dark night"],
    "p2": ["x", "y y", "happy happy", "sad tree"],
    "p3": ["river", "a kind friend", "the worst answer", "ok"],
}


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny reward models of different seeds: different weights, so they disagree."""
    folder = tmp_path_factory.mktemp("ensemble")
    return [str(build_tiny(folder / f"rm-{seed}", kind="reward_model", seed=seed)) for seed in (0, 1, 2)]


def test_rows_record_members_and_the_conservative_score(members):
    generations = make_generations(RESPONSES)
    alone = np.array([RewardModelAnnotator(m, ScoreRules()).score(generations["prompt_messages"],
                                                                  generations["response"]) for m in members])
    penalty = 0.5
    ensemble = RewardModelEnsemble(members, ScoreRules(mode="pairs"), penalty=penalty)
    rows = ensemble.annotate(generations)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    index = {gid: i for i, gid in enumerate(generations["generation_id"])}
    conservative = alone.mean(axis=0) - penalty * alone.std(axis=0)
    for row in rows:
        first, second = index[row["generation1_id"]], index[row["generation2_id"]]
        raw = json.loads(row["raw"])
        assert raw["members"][row["generation1_id"]] == pytest.approx(list(alone[:, first]), abs=1e-5)
        # The pair is chosen, and scored, on mean - penalty * std: best against worst of the prompt's samples.
        assert row["score1"] == pytest.approx(conservative[first], abs=1e-5)
        assert row["score2"] == pytest.approx(conservative[second], abs=1e-5)
        prompt_rows = [index[g] for g in generations.loc[generations["prompt_id"] == row["prompt_id"],
                                                         "generation_id"]]
        assert conservative[first] == pytest.approx(max(conservative[prompt_rows]), abs=1e-6)
        assert conservative[second] == pytest.approx(min(conservative[prompt_rows]), abs=1e-6)
        margins = alone[:, first] - alone[:, second]
        assert raw["disagreement"] == pytest.approx(float(margins.std()), abs=1e-5)
        assert row["confidence"] == pytest.approx(float((margins > 0).mean()))
        assert row["agreement"] == bool((margins > 0).all())
        assert row["annotator"].startswith("reward_ensemble:")


def test_pairs_where_members_disagree_abstain(members):
    generations = make_generations(RESPONSES)
    disagreements = sorted(json.loads(r["raw"])["disagreement"]
                           for r in RewardModelEnsemble(members, ScoreRules()).annotate(generations))
    threshold = (disagreements[0] + disagreements[1]) / 2  # the most agreed pair stays, the other two abstain
    rows = RewardModelEnsemble(members, ScoreRules(), max_disagreement=threshold).annotate(generations)
    assert sorted(r["status"] for r in rows) == ["abstained", "abstained", "ok"]
    for row in rows:
        raw = json.loads(row["raw"])
        assert (row["status"] == "abstained") == (raw["disagreement"] > threshold)
        if row["status"] == "abstained":  # no label: units are never built from it
            assert row["generation1_reward"] is None and row["generation2_reward"] is None
        else:
            assert (row["generation1_reward"], row["generation2_reward"]) == (1.0, 0.0)


def test_pointwise_rows_abstain_on_their_member_spread(members):
    generations = make_generations(RESPONSES)
    rows = RewardModelEnsemble(members, ScoreRules(mode="rewards")).annotate(generations)
    spreads = sorted(json.loads(r["raw"])["disagreement"] for r in rows)
    threshold = spreads[len(spreads) // 2]
    rows = RewardModelEnsemble(members, ScoreRules(mode="rewards"), max_disagreement=threshold).annotate(generations)
    abstained = [r for r in rows if r["status"] == "abstained"]
    assert len(abstained) == sum(s > threshold for s in spreads) > 0
    assert all(r["generation1_reward"] is None for r in abstained)


def test_config_wires_the_ensemble(members, tmp_path):
    settings = {"setup": "online_pairwise", "annotation": {"annotator": "reward_model", "reward_model": members,
                                                            "ensemble_penalty": 0.25, "max_disagreement": 0.5}}
    cfg = parse_config(settings)
    annotator = make_annotator(cfg)
    assert isinstance(annotator, RewardModelEnsemble) and len(annotator.members) == 3
    assert (annotator.penalty, annotator.max_disagreement) == (0.25, 0.5)
    # Each member's digest is in the annotations' fingerprint: retraining one member redoes the labels.
    digests = annotator_models(cfg, ArtifactStore(str(tmp_path)))
    assert list(digests) == ["reward_model[0]", "reward_model[1]", "reward_model[2]"]
    assert len(set(digests.values())) == 3
    one = parse_config({"setup": "online_pairwise",
                        "annotation": {"annotator": "reward_model", "reward_model": members[0]}})
    assert list(annotator_models(one, ArtifactStore(str(tmp_path)))) == ["reward_model"]  # fingerprints kept
    with pytest.raises(ConfigError, match="need an ensemble"):
        parse_config({"setup": "online_pairwise", "annotation": {"annotator": "reward_model",
                                                                  "reward_model": members[0],
                                                                  "max_disagreement": 0.5}})
