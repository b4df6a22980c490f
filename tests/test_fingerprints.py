"""Fingerprints name what a stage reads, not only the config text: data files, judge templates, reward
functions, models and the library code that produces the stage. A changed input redoes the stage; a finished
iteration is not silently redone from something else."""

import importlib
import sys

import pytest

from alignment_core import digests, pipeline
from alignment_core.config import parse_config
from alignment_core.store import CHECKPOINT_MARKER
from tests.helpers import write_jsonl
from tests.test_annotation import make_generations, write_generations
from tests.test_annotation_http import scripted_server


def config(tmp_path, **sections):
    base = {
        "data": {"source": str(tmp_path / "prompts.jsonl"), "eval_prompts": 1},
        "generation": {"prompts_per_iteration": 2, "n_samples": 2, "max_new_tokens": 8,
                       "backend": "transformers"},
        "annotation": {"annotator": "programmatic"},
        "evaluation": {"enabled": False},
        "store": {"root": str(tmp_path / "store"), "run_name": "fp", "cache_dir": str(tmp_path / "cache")},
    }
    for name, value in sections.items():
        base[name] = {**base.get(name, {}), **value} if isinstance(value, dict) else value
    return parse_config(base)




def manifest(cfg, iteration: int, stage: str) -> dict:
    store = pipeline.open_store(cfg)
    return store.read_manifest(store.stage_uri(cfg.store.run_name, iteration, stage))


# ---- data files ---------------------------------------------------------------------------------------------
def test_a_data_file_replaced_in_place_redoes_the_prompts_and_examples(tmp_path):
    source = tmp_path / "prompts.jsonl"
    write_jsonl(source, [{"prompt": f"Tell me about topic {i}."} for i in range(4)])
    cfg = config(tmp_path)
    uri = pipeline.load_prompts(cfg, 1)
    first = manifest(cfg, 1, "prompts")
    assert pipeline.load_prompts(cfg, 1) == uri and manifest(cfg, 1, "prompts")["created_at"] == first["created_at"]

    write_jsonl(source, [{"prompt": f"Write a poem about thing {i}."} for i in range(4)])  # same name, new rows
    pipeline.load_prompts(cfg, 1)
    second = manifest(cfg, 1, "prompts")
    assert second["fingerprint_digest"] != first["fingerprint_digest"]
    prompts = pipeline.open_store(cfg).read_pandas(uri)["prompt"]
    assert prompts.str.startswith("Write a poem").all()

    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": f"Q{i}?", "chosen": "yes indeed", "rejected": "no"} for i in range(4)])
    offline = config(tmp_path, setup="offline_pairwise", data={"source": str(pairs)})
    pipeline.load_examples(offline)
    before = manifest(offline, 0, "examples")
    write_jsonl(pairs, [{"prompt": f"Q{i}?", "chosen": "certainly", "rejected": "no"} for i in range(4)])
    pipeline.load_examples(offline)
    after = manifest(offline, 0, "examples")
    assert after["fingerprint_digest"] != before["fingerprint_digest"]
    examples = pipeline.open_store(offline).read_pandas(pipeline.open_store(offline).stage_uri("fp", 0, "examples"))
    assert set(examples["chosen"]) == {"certainly"}


def test_file_digest_is_the_content_and_is_computed_once_per_stamp(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n')
    first = digests.file_digest(str(path))
    reads = []
    real = digests._sha256_of
    monkeypatch.setattr(digests, "_sha256_of", lambda handle: reads.append(1) or real(handle))
    assert digests.file_digest(str(path)) == first and reads == []  # same stamp: not read again
    path.write_text('{"prompt": "b"}\n')  # same size, new content
    assert digests.file_digest(str(path)) != first and reads == [1]
    assert digests.data_source_digest("bundled:prompts").startswith("sha256:")
    assert digests.data_source_digest("acme/some-dataset", "a" * 40) == "hub:" + "a" * 40


# ---- judge templates and reward functions -------------------------------------------------------------------
class AlwaysA:
    """A judge that always prefers the first response, and records what it was asked."""

    def __init__(self):
        self.requests: list[str] = []

    def answer(self, headers: dict, body: dict) -> tuple[int, dict]:
        self.requests.append(body["messages"][0]["content"])
        content = {"role": "assistant", "content": "A"}
        return 200, {"choices": [{"index": 0, "message": content, "finish_reason": "stop"}]}


@pytest.fixture
def judge():
    script = AlwaysA()
    with scripted_server(script) as url:
        yield url, script


def test_an_edited_judge_template_redoes_the_annotations(tmp_path, judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    base_url, script = judge
    template = tmp_path / "judge.jinja"
    template.write_text("Prompt: {{ prompt }}\nA: {{ response_a }}\nB: {{ response_b }}\nWhich is better, A or B?")
    cfg = config(tmp_path, annotation={"annotator": "judge_pairwise", "judge": {
        "backend": "http", "base_url": base_url, "model": "judge", "template": str(template)}})
    store = pipeline.open_store(cfg)
    generations = write_generations(store, make_generations({"p0": ["one", "two"], "p1": ["three", "four"]}))
    out = pipeline.annotate(cfg, generations, 1)
    first = store.read_manifest(out)
    assert len(script.requests) == 4
    pipeline.annotate(cfg, generations, 1)
    assert len(script.requests) == 4  # unchanged: skipped

    template.write_text(template.read_text().replace("Which is better", "Which one is more helpful"))
    pipeline.annotate(cfg, generations, 1)
    second = store.read_manifest(out)
    assert second["fingerprint_digest"] != first["fingerprint_digest"]
    assert len(script.requests) == 8 and all("more helpful" in p for p in script.requests[4:])
    assert second["extra"]["annotators"] != first["extra"]["annotators"]  # the judge's name carries the digest


def test_a_changed_reward_function_redoes_the_annotations(tmp_path, monkeypatch):
    module = tmp_path / "my_reward_fn.py"
    module.write_text("def score(prompt, response):\n    return len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cfg = config(tmp_path, annotation={"programmatic": "my_reward_fn:score"})
    store = pipeline.open_store(cfg)
    generations = write_generations(store, make_generations({"p0": ["short", "a much longer answer"]}))
    out = pipeline.annotate(cfg, generations, 1)
    first = store.read_manifest(out)
    assert store.read_pandas(out)["generation1_id"].tolist() == ["p0-g1"]  # the longer answer wins

    module.write_text("def score(prompt, response):\n    return -len(response)  # shorter is better now\n")
    importlib.reload(importlib.import_module("my_reward_fn"))
    pipeline.annotate(cfg, generations, 1)
    assert store.read_manifest(out)["fingerprint_digest"] != first["fingerprint_digest"]
    assert store.read_pandas(out)["generation1_id"].tolist() == ["p0-g0"]  # redone with the new function
    sys.modules.pop("my_reward_fn", None)


def test_oracle_and_reward_digests_follow_the_module_file(tmp_path, monkeypatch):
    module = tmp_path / "my_oracle_fn.py"
    module.write_text("def oracle(prompt, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = digests.callable_digest("my_oracle_fn:oracle")
    module.write_text("def oracle(prompt, response):\n    return 2.0  # changed\n")
    assert digests.callable_digest("my_oracle_fn:oracle") != before
    assert digests.callable_digest("alignment_core.rewards:positive_words").startswith("sha256:")


# ---- finished iterations --------------------------------------------------------------------------------------
def test_a_finished_iteration_is_not_redone_from_a_changed_config_without_force(tmp_path):
    from flows.common import config_from_cli, parse_cli

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    cfg = config(tmp_path)
    uri = pipeline.load_prompts(cfg, 1)
    store = pipeline.open_store(cfg)
    checkpoint = store.checkpoint_uri("fp", 1)
    store.write_json(f"{checkpoint}/{CHECKPOINT_MARKER}", {"files": []})  # iteration 1 finished
    changed = config(tmp_path, generation={"prompts_per_iteration": 3})
    with pytest.raises(pipeline.FinishedIterationChangedError, match=r"(?s)iteration 1 of run 'fp' is finished.*"
                       r"its inputs \(per_iteration\) changed.*--run-name.*--force"):
        pipeline.load_prompts(changed, 1)
    assert store.read_pandas(uri).shape[0] == 2  # untouched

    assert pipeline.load_prompts(cfg, 1) == uri  # the same config: skipped, no complaint
    forced = changed.model_copy(update={"store": changed.store.model_copy(update={"force_rerun": True})})
    pipeline.load_prompts(forced, 1)
    assert store.read_pandas(uri).shape[0] == 3

    args = parse_cli("test", ["--config", "configs/tiny.yaml", "--force"])
    assert config_from_cli(args).store.force_rerun is True
    assert config_from_cli(parse_cli("test", ["--config", "configs/tiny.yaml"])).store.force_rerun is False


def test_a_finished_iteration_computed_by_older_library_code_is_kept(tmp_path, caplog):
    """An upgrade does not redo (or block) finished iterations: a scheduled run continues after them."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    cfg = config(tmp_path)
    uri = pipeline.load_prompts(cfg, 1)
    store = pipeline.open_store(cfg)
    written = store.read_manifest(uri)
    # As a run written by an earlier release looks: the same fingerprint but for the code digest.
    store.write_json(f"{uri}/_manifest.json", {**written, "fingerprint": {**written["fingerprint"], "code": "0.1.0"},
                                               "fingerprint_digest": "older"})
    store.write_json(f"{store.checkpoint_uri('fp', 1)}/{CHECKPOINT_MARKER}", {"files": []})  # iteration 1 finished
    caplog.set_level("INFO", logger="alignment_core")
    assert pipeline.load_prompts(cfg, 1) == uri
    assert store.read_manifest(uri)["fingerprint_digest"] == "older"  # kept, not rewritten
    assert "earlier version of the library; kept" in caplog.text
    # An unfinished iteration is redone with the new code.
    store.fs.rm(store._path(f"{store.checkpoint_uri('fp', 1)}/{CHECKPOINT_MARKER}"))
    pipeline.load_prompts(cfg, 1)
    assert store.read_manifest(uri)["fingerprint_digest"] == written["fingerprint_digest"]


@pytest.mark.slow
def test_relabelling_an_iteration_with_a_new_judge_reuses_its_generations(tmp_path, judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    base_url, script = judge
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(4)])
    cfg = config(tmp_path, model={"policy": "tiny://llama"})
    prompts = pipeline.load_prompts(cfg, 1)
    generations = pipeline.generate(cfg, prompts, cfg.model.policy, 1)
    annotations = pipeline.annotate(cfg, generations, 1)
    store = pipeline.open_store(cfg)
    generated, labelled = store.read_manifest(generations), store.read_manifest(annotations)

    relabel = config(tmp_path, model={"policy": "tiny://llama"}, annotation={"annotator": "judge_pairwise", "judge": {
        "backend": "http", "base_url": base_url, "model": "judge"}})
    assert pipeline.load_prompts(relabel, 1) == prompts
    assert pipeline.generate(relabel, prompts, relabel.model.policy, 1) == generations
    assert store.read_manifest(generations)["created_at"] == generated["created_at"]  # not generated again
    pipeline.annotate(relabel, generations, 1)
    relabelled = store.read_manifest(annotations)
    assert relabelled["fingerprint_digest"] != labelled["fingerprint_digest"]
    assert relabelled["extra"]["annotators"][0].startswith("judge:judge:helpfulness@")
    assert len(script.requests) == 2 * 2  # two prompts, one pair each, both orders

    # The same judge again on a fresh copy of the stage (e.g. after it was deleted): answered by the cache.
    store.fs.rm(store._path(annotations), recursive=True)
    pipeline.annotate(relabel, generations, 1)
    assert len(script.requests) == 4  # always "A": the orders disagree, two ties, as before
    assert store.read_manifest(annotations)["extra"]["counts"] == relabelled["extra"]["counts"] == {"tie": 2}


def test_a_round_trained_against_another_reference_is_not_the_same_round(tmp_path):
    """The reference is an input of the round (DPO's log-ratio is taken against it): the same units, weights and
    policy with another reference make another round, which a finished iteration refuses to become."""
    import pyarrow as pa

    from alignment_core.tiny import build_tiny
    from tests.test_training import make_units

    policy, other = (str(build_tiny(tmp_path / name, num_layers=2, seed=seed)) for name, seed in (("a", 0), ("b", 1)))
    cfg = config(tmp_path, setup="offline_pairwise", model={"policy": policy},
                 training={"loss": "dpo", "batch_size": 4, "epochs": 1})
    store = pipeline.open_store(cfg)
    units_uri = store.stage_uri("fp", 1, "units")
    store.write_stage(units_uri, "units", {"test": 1}, [pa.Table.from_pandas(make_units(4))])
    weights_uri = pipeline.reweight(cfg, units_uri, policy, 1)
    checkpoint = pipeline.train(cfg, units_uri, weights_uri, policy, policy, 1)
    assert pipeline.train(cfg, units_uri, weights_uri, policy, policy, 1) == checkpoint  # the same round: skipped
    with pytest.raises(pipeline.FinishedIterationChangedError, match=r"its inputs \(reference\) changed"):
        pipeline.train(cfg, units_uri, weights_uri, policy, other, 1)
