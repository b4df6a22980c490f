"""The annotator table (alignment_core/annotators.py): it agrees with the config's choices, each row's pairs-only
rule is the config's, and every row labels generations end to end through `make_annotator`, as
tests/test_wiring.py runs every loss."""

import re
import typing

import pytest

from alignment_core.annotation.base import LABEL_STATUSES
from alignment_core.annotation.human import FormAnswers
from alignment_core.annotation.stage import make_annotator
from alignment_core.annotators import ANNOTATORS, models_loaded_here
from alignment_core.config import AnnotationConfig, CascadeConfig, ConfigError, parse_config
from alignment_core.evaluation import annotator_label
from tasks.dispatch import uses_gpu
from tests.test_annotation import make_generations
from tests.test_annotation_http import completion, scripted_server

# two samples per prompt: the one with "good" in it is the better answer
GENERATIONS = {"p0": ["a bad answer", "a good answer"], "p1": ["a good answer", "a bad answer"]}


def choices(model, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_the_table_is_the_configs_choice_of_annotators():
    assert choices(AnnotationConfig, "annotator") == set(ANNOTATORS) | {"cascade"}  # a cascade combines two rows
    assert choices(CascadeConfig, "first") | choices(CascadeConfig, "escalate_to") <= set(ANNOTATORS)


class ContentJudge:
    """An OpenAI-compatible judge that prefers the response with "good" in it (pairwise: A or B; pointwise:
    yes or no)."""

    def answer(self, headers: dict, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        if "[Response A]" in prompt:
            first = prompt.split("[Response A]", 1)[1].split("[Response B]", 1)[0]
            return 200, completion("A" if "good" in first else "B")
        response = re.split(r"\[Response\]|Response:", prompt)[-1]
        return 200, completion("yes" if "good" in response.split("Is this response")[0] else "no")


def person(pairs):
    """An `ask` that picks the response with "good" in it."""
    return FormAnswers({pair.key: "first" if "good" in pair.first else "second" for pair in pairs},
                       labeller="test", timed_out=False, answered_at="2026-01-01T00:00:00+00:00", seconds_open=1.0)


def row_config(kind: str, tiny_reward_model_dir, judge_url: str) -> dict:
    annotation = {"annotator": kind, "reward_model": str(tiny_reward_model_dir),
                  "judge": {"backend": "http", "base_url": judge_url, "model": "judge-model", "max_retries": 0}}
    return {"setup": "online_pairwise", "annotation": annotation,
            "evaluation": {"enabled": kind != "human"}}


@pytest.mark.parametrize("kind", list(ANNOTATORS))
def test_every_row_labels_generations_through_make_annotator(kind, tiny_reward_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_CORE_ALLOWED_HOSTS", "127.0.0.1")
    with scripted_server(ContentJudge()) as url:
        cfg = parse_config(row_config(kind, tiny_reward_model_dir, url))
        annotator = make_annotator(cfg, ask=person)
        rows = annotator.annotate(make_generations(GENERATIONS))
    assert len(rows) == 2 and all(row["status"] in LABEL_STATUSES for row in rows), rows
    assert all(row["generation1_reward"] is not None for row in rows)
    if kind != "reward_model":  # the tiny reward model's preference is its own; the others know "good"
        assert {row["prompt_id"]: row["generation1_id"] for row in rows} == {"p0": "p0-g1", "p1": "p1-g0"}
    # what the row says of itself reaches the summaries and the GPU dispatch
    assert annotator_label(cfg) == ANNOTATORS[kind].describe(cfg.annotation)
    assert uses_gpu(cfg, "annotations") == bool(ANNOTATORS[kind].models(cfg.annotation))
    assert uses_gpu(cfg, "annotations") == (kind == "reward_model")  # the judge is HTTP: it runs elsewhere


@pytest.mark.parametrize("kind", [kind for kind, row in ANNOTATORS.items() if row.pairs_only])
def test_a_pairs_only_annotator_is_refused_for_a_pointwise_setup(kind):
    with pytest.raises(ConfigError):
        parse_config({"setup": "online_pointwise", "annotation": {"annotator": kind},
                      "evaluation": {"enabled": False}})


def test_the_models_a_cascade_loads_here_are_both_annotators():
    cascade = AnnotationConfig(annotator="cascade", reward_model=["rm-a", "rm-b"],
                               judge={"backend": "local", "model": "judge-m"},
                               cascade={"first": "reward_model", "escalate_to": "judge_pairwise"})
    assert models_loaded_here(cascade) == {"annotation.reward_model[0]": "rm-a", "annotation.reward_model[1]": "rm-b",
                                           "annotation.judge.model": "judge-m"}
