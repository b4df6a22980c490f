"""A person as annotator (alignment_core/annotation/human.py, tasks/human.py): answers become rows, skips and
unanswered pairs are recorded and not trained on, a resumed stage does not ask again; and on a real
`prefect server start`, a flow run pauses with the form, is answered through the API, and writes those labels."""

import json
import re
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest
from prefect.exceptions import ObjectNotFound

from alignment_core.annotation.base import LABEL_STATUSES, ScoreRules
from alignment_core.annotation.cascade import CascadeAnnotator
from alignment_core.annotation.human import FormAnswers, HumanAnnotator, NoOneToAskError
from alignment_core.annotation.scorers import ProgrammaticAnnotator
from alignment_core.annotation.stage import make_annotator, run_annotation
from alignment_core.batches import units_from_online
from alignment_core.config import ConfigError, parse_config
from alignment_core.evaluation import annotator_label
from alignment_core.store import ArtifactStore
from tests.helpers import REPO, SMALL, write_config
from tests.test_annotation import make_generations, write_generations
from tests.test_deployment import running_prefect_server

RESPONSES = {"p0": ["a good day", "rain"], "p1": ["cold", "a great friend"], "p2": ["same", "same too"],
             "p3": ["meh", "hmm"], "p4": ["nice", "grey"]}
# What the person thinks of each prompt's two responses, by content (not by the order they are shown in).
PREFERRED = {"p0": "a good day", "p1": "a great friend", "p2": "tie", "p3": "skip"}  # p4: left blank


class Person:
    """An `ask` that answers by content, as a person would, and records every form it was shown."""

    def __init__(self, preferred=PREFERRED, timed_out=False):
        self.preferred, self.timed_out, self.forms = preferred, timed_out, []

    def __call__(self, pairs):
        self.forms.append(pairs)
        choices = {}
        for pair in pairs:
            wish = next((v for k, v in self.preferred.items() if f"Question {k}?" == pair.prompt), None)
            choices[pair.key] = {pair.first: "first", pair.second: "second", "tie": "tie", "skip": "skip"}.get(wish)
        if self.timed_out:
            choices = {}
        return FormAnswers(choices, labeller="ada", timed_out=self.timed_out, answered_at="2025-01-01T00:00:00+00:00",
                           seconds_open=12.5)


def by_prompt(rows) -> dict[str, dict]:
    return {row["prompt_id"]: row for row in rows}


def response_of(generations: pd.DataFrame, generation_id: str) -> str:
    return generations.set_index("generation_id").loc[generation_id, "response"]


def test_answers_become_rows_with_the_preferred_response_first():
    generations = make_generations(RESPONSES)
    rows = by_prompt(HumanAnnotator(Person(), max_pairs_per_form=8).annotate(generations))
    for pid in ("p0", "p1"):  # first or second as shown, read back to the response the person preferred
        row = rows[pid]
        assert row["status"] == "ok" and row["annotator"] == "human" and row["kind"] == "pairwise"
        assert response_of(generations, row["generation1_id"]) == PREFERRED[pid]
        assert (row["generation1_reward"], row["generation2_reward"]) == (1.0, 0.0)
        raw = json.loads(row["raw"])
        assert raw["labeller"] == "ada" and raw["answered_at"].startswith("2025") and raw["seconds_open"] == 12.5
    assert rows["p2"]["status"] == "tie" and (rows["p2"]["generation1_reward"], rows["p2"]["generation2_reward"]) == (
        0.5, 0.5)
    assert rows["p3"]["status"] == "skipped" and json.loads(rows["p3"]["raw"])["choice"] == "skip"
    assert rows["p4"]["status"] == "unanswered" and json.loads(rows["p4"]["raw"])["reason"] == "left blank in the form"
    for pid in ("p3", "p4"):
        assert rows[pid]["generation1_reward"] is None and rows[pid]["status"] not in LABEL_STATUSES


def test_skipped_and_unanswered_pairs_are_not_trained_on_and_are_counted(tmp_path):
    store = ArtifactStore(str(tmp_path))
    generations = make_generations(RESPONSES)
    cfg = parse_config({"setup": "online_pairwise", "evaluation": {"enabled": False},
                        "generation": {"shard_size": 5, "prompts_per_iteration": 5},
                        "annotation": {"annotator": "human"}})
    out = store.stage_uri("run", 1, "annotations")
    manifest = run_annotation(store, write_generations(store, generations), out, cfg, {"t": 1}, ask=Person())
    summary = manifest["extra"]
    assert summary["unanswered"] == 1 and summary["counts"] == {"ok": 2, "skipped": 1, "tie": 1, "unanswered": 1}
    assert summary["failures"] == 0  # nobody answering is not an annotator failure
    units = units_from_online(generations, store.read_pandas(out), "online_pairwise")
    assert sorted(units["prompt_id"]) == ["p0", "p1"]  # a tie is a label, but no preference pair to train on


def test_forms_hold_at_most_max_pairs_and_a_timed_out_form_ends_the_asking(tmp_path):
    generations = make_generations(RESPONSES)
    person = Person()
    HumanAnnotator(person, max_pairs_per_form=2).annotate(generations)
    assert [len(form) for form in person.forms] == [2, 2, 1]

    away = Person(timed_out=True)
    rows = HumanAnnotator(away, max_pairs_per_form=2).annotate(generations)
    assert len(away.forms) == 1  # one timeout, not one per form
    assert [row["status"] for row in rows] == ["unanswered"] * 5
    reasons = [json.loads(row["raw"])["reason"] for row in rows]
    assert reasons.count("the form timed out") == 2
    assert reasons.count("not asked: an earlier form timed out unanswered") == 3


def test_a_killed_stage_does_not_ask_again_for_pairs_already_answered(tmp_path):
    store = ArtifactStore(str(tmp_path))
    generations = make_generations(RESPONSES)
    cfg = parse_config({"setup": "online_pairwise", "evaluation": {"enabled": False},
                        "generation": {"shard_size": 5, "prompts_per_iteration": 5},
                        "annotation": {"annotator": "human", "human": {"max_pairs_per_form": 3}}})
    generations_uri = write_generations(store, generations)
    out = store.stage_uri("run", 1, "annotations")

    class KilledAtTheSecondForm(Person):
        def __call__(self, pairs):
            if self.forms:
                raise KeyboardInterrupt("the process was killed while the second form waited")
            return super().__call__(pairs)

    first = KilledAtTheSecondForm()
    with pytest.raises(KeyboardInterrupt):
        run_annotation(store, generations_uri, out, cfg, {"t": 1}, ask=first)
    assert store.read_manifest(out) is None  # no shard, no manifest: only the first form's answers are stored
    again = Person()
    manifest = run_annotation(store, generations_uri, out, cfg, {"t": 1}, ask=again)
    asked_first = {pair.key for pair in first.forms[0]}
    asked_again = [pair.key for form in again.forms for pair in form]
    assert len(asked_first) == 3 and len(asked_again) == 2 and not asked_first & set(asked_again)
    rows = by_prompt(store.read_pandas(out).to_dict("records"))
    assert manifest["extra"]["counts"] == {"ok": 2, "skipped": 1, "tie": 1, "unanswered": 1}
    assert response_of(generations, rows["p0"]["generation1_id"]) == "a good day"
    # A finished stage is not asked again at all (its annotator is never built).
    never = Person()
    run_annotation(store, generations_uri, out, cfg, {"t": 1}, ask=never)
    assert never.forms == []


def test_without_a_way_to_ask_a_person_the_annotator_refuses_to_start():
    cfg = parse_config({"setup": "online_pairwise", "evaluation": {"enabled": False},
                        "annotation": {"annotator": "human"}})
    with pytest.raises(NoOneToAskError, match="pipeline.annotate\\(..., ask=your_function\\)"):
        make_annotator(cfg)
    assert isinstance(make_annotator(cfg, ask=Person()), HumanAnnotator)


def test_config_human_alone_needs_evaluation_off_and_a_cascade_evaluates_with_its_first_annotator():
    with pytest.raises(ConfigError, match="held-out evaluation needs an automatic judge"):
        parse_config({"setup": "online_pairwise", "annotation": {"annotator": "human"}})
    with pytest.raises(ConfigError, match="gives preference pairs"):
        parse_config({"setup": "rl", "training": {"loss": "rl"}, "evaluation": {"enabled": False},
                      "annotation": {"annotator": "human"}})
    cascade = parse_config({"setup": "online_pairwise", "annotation": {
        "annotator": "cascade", "cascade": {"first": "programmatic", "escalate_to": "human"},
        "human": {"timeout_s": 30, "max_pairs_per_form": 2}}})
    assert annotator_label(cascade) == "rule alignment_core.rewards:positive_words"
    assert cascade.annotation.human.max_pairs_per_form == 2


def test_a_cascade_asks_its_escalated_pairs_of_a_shard_in_one_form():
    generations = make_generations({f"p{i}": ["a good day", "rain", "a great friend", "cold"] for i in range(4)})
    person = Person(preferred={f"p{i}": "rain" for i in range(4)})  # against the rule, where asked
    rules = ScoreRules(pair_selection="all_pairs")
    first = ProgrammaticAnnotator("alignment_core.rewards:positive_words", rules)
    cascade = CascadeAnnotator(first, HumanAnnotator(person, max_pairs_per_form=8), budget=0.5,
                               prompts_per_iteration=4)
    rows = cascade.annotate(generations)
    human = [row for row in rows if row["annotator"] == "human"]
    assert len(person.forms) == 1 and len(person.forms[0]) == len(human) == 2  # the budget: 2 of 4 prompts
    assert len(rows) == len(first.annotate(generations))  # every pair once, whoever labelled it
    for row in human:
        record = json.loads(row["raw"])["cascade"]
        assert record["escalated"] and record["replaced"]["annotator"].startswith("programmatic")
    # Each pair put to the person: "rain" preferred where it is one of the two, else left blank.
    for row in human:
        pair = {response_of(generations, row["generation1_id"]), response_of(generations, row["generation2_id"])}
        if "rain" in pair:
            assert response_of(generations, row["generation1_id"]) == "rain" and row["status"] == "ok"
        else:
            assert row["status"] == "unanswered"


# ---- a real `prefect server start`: the flow run pauses, the form is answered through the API ----------------
def form_of(client, process, seen: set, timeout: float = 300):
    """The next paused flow run (a pause not in `seen`) and its form: (run, schema, description)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the flow run ended before it paused"
        for run in client.read_flow_runs():
            details = run.state.state_details if run.state else None
            if run.state and run.state.is_paused() and details.pause_key not in seen:
                keyset = details.run_input_keyset
                try:
                    schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
                    description = client.read_flow_run_input(run.id, keyset["description"])
                except (httpx.HTTPStatusError, ObjectNotFound):  # paused, its form not saved yet
                    continue
                seen.add(details.pause_key)
                return run, schema, json.loads(description)
        time.sleep(0.5)
    raise TimeoutError(f"no paused flow run after {timeout} s")


def shown_pairs(schema: dict) -> dict[str, dict]:
    """The form's pairs as a person reads them: field -> prompt, first, second (from its description), key."""
    pairs = {}
    for name, field in schema["properties"].items():
        if name.startswith("pair_"):
            text = re.fullmatch(r"PROMPT:\n(.*)\n\nFIRST:\n(.*)\n\nSECOND:\n(.*)", field["description"], re.S)
            assert text and field["title"].startswith("Pair "), field
            pairs[name] = {"prompt": text[1], "first": text[2], "second": text[3], "key": field["pair_key"]}
    return pairs


def run_in_background(config, env, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "flows.iterative_dpo", "--config", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def human_config(tmp_path, root, run_name: str, timeout_s: int):
    return write_config(tmp_path, str(root), iterations=1, evaluation={"enabled": False},
                        generation={**SMALL["generation"], "prompts_per_iteration": 4, "shard_size": 4},
                        annotation={"annotator": "human", "human": {"timeout_s": timeout_s, "max_pairs_per_form": 3}},
                        store={"run_name": run_name, "root": str(root)})


@pytest.mark.slow
def test_a_person_answers_the_paused_runs_form_and_unanswered_forms_time_out(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path / "store"
    store = ArtifactStore(str(root))
    with running_prefect_server(tmp_path) as (api, env), temporary_settings({PREFECT_API_URL: api}), \
            get_client(sync_client=True) as client:
        # A person answers: the 4 pairs come in two forms (max_pairs_per_form 3), each answered through the API.
        process, log = run_in_background(human_config(tmp_path, root, "answered", 300), env, tmp_path / "run.log")
        seen, answers = set(), {}
        try:
            for choices in (["first", "second", "skip"], ["tie"]):
                run, schema, description = form_of(client, process, seen)
                assert "Label" in description and "first" in description
                pairs = shown_pairs(schema)
                assert len(pairs) == len(choices) and schema["properties"]["labeller"]["title"] == "Your name"
                run_input = dict(zip(pairs, choices, strict=True))
                resume_flow_run(run.id, run_input={**run_input, "labeller": "ada"})
                answers.update({pairs[name]["key"]: (pairs[name], choice) for name, choice in run_input.items()})
            assert process.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-5000:]
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        annotations = store.read_pandas(store.stage_uri("answered", 1, "annotations"))
        generations = store.read_pandas(store.stage_uri("answered", 1, "generations"))
        assert len(annotations) == 4
        for row in annotations.to_dict("records"):
            raw = json.loads(row["raw"])
            pair, choice = answers[raw["pair_key"]]
            shown = raw["shown"]
            assert [response_of(generations, gid) for gid in shown] == [pair["first"], pair["second"]]
            assert raw["labeller"] == "ada" and raw["answered_at"] and raw["seconds_open"] > 0
            status = {"first": "ok", "second": "ok", "tie": "tie", "skip": "skipped"}[choice]
            assert row["status"] == status and row["annotator"] == "human"
            if choice in ("first", "second"):  # the chosen response is generation1, the preferred one
                assert row["generation1_id"] == shown[0 if choice == "first" else 1]
        units = store.read_pandas(store.stage_uri("answered", 1, "units"))
        assert len(units) == 2  # the two preferences; the tie and the skip give no pair to train on
        assert store.checkpoint_complete(store.checkpoint_uri("answered", 1))

        # Nobody answers: the first form times out, the second is not shown, the run goes on with nothing to train.
        started = time.time()
        process, log = run_in_background(human_config(tmp_path, root, "away", 3), env, tmp_path / "away.log")
        try:
            run, _, _ = form_of(client, process, seen)
            assert process.wait(timeout=600) == 0, (tmp_path / "away.log").read_text()[-5000:]
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        annotations = store.read_pandas(store.stage_uri("away", 1, "annotations"))
        assert list(annotations["status"]) == ["unanswered"] * 4
        assert store.read_manifest(store.stage_uri("away", 1, "annotations"))["extra"]["unanswered"] == 4
        assert len(store.read_pandas(store.stage_uri("away", 1, "units"))) == 0
        assert store.checkpoint_complete(store.checkpoint_uri("away", 1))  # the policy carried over
        states = [state.type.value for state in client.read_flow_run_states(run.id)]
        assert "FAILED" not in states and states[-1] == "COMPLETED", states  # resumed by the deadline, not failed
        assert time.time() - started < 300


def test_without_a_prefect_server_the_preflight_warns_that_no_one_can_answer(monkeypatch):
    from alignment_core.preflight import preflight_warnings

    cfg = parse_config({"setup": "online_pairwise", "evaluation": {"enabled": False},
                        "annotation": {"annotator": "human", "human": {"timeout_s": 90}}})
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    warnings = [w for w in preflight_warnings(cfg) if "person" in w]
    assert len(warnings) == 1 and "PREFECT_API_URL" in warnings[0] and "90 s" in warnings[0]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert not [w for w in preflight_warnings(cfg) if "person" in w]
    monkeypatch.delenv("PREFECT_API_URL")
    programmatic = parse_config({"setup": "online_pairwise", "evaluation": {"enabled": False}})
    assert not [w for w in preflight_warnings(programmatic) if "person" in w]
