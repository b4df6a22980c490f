"""The stage table (alignment_core/stages.py) and its one runner (`runner.run_stage`), row by row, as
tests/test_wiring.py runs every loss: every stage is computed once, skipped when its fingerprint is unchanged,
and when its config section or the library code changes it is redone, or (a stage of a finished iteration)
kept when only the code changed and refused when anything else did."""

import json
import logging
import shutil

import pytest

from alignment_core import pipeline, runner
from alignment_core.config import parse_config
from alignment_core.pipeline import FinishedIterationChangedError
from alignment_core.stages import STAGES
from alignment_core.store import MANIFEST
from alignment_core.tiny import build_tiny
from tests.test_pipeline import online_iteration

PAIRS = [{"prompt": f"Say something about the {thing}.", "chosen": f"A good happy {thing}.",
          "rejected": f"A sad cold {thing}."} for thing in ("road", "cup", "tree", "door", "lamp", "boat")]
# One field of each section a row's fingerprint reads, at another value.
SECTION_CHANGES = {
    "data": {"data": {"max_rows": 1000}},
    "generation": {"generation": {"temperature": 0.5}},
    "evaluation": {"evaluation": {"temperature": 0.5}},
    "annotation": {"annotation": {"cascade": {"budget": 0.25}}},
    "reweight": {"reweight": {"clip": 2.0}},
    "training": {"training": {"beta": 0.2}},
}
# Which section a row's change goes to (generations are fingerprinted by the generation config they sample with).
CHANGED_SECTION = {"eval_generations": "evaluation"}


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store holding every row of the table: an online run (a cascade of two tiny reward models escalating to
    the true reward, refreshed before iteration 2; one finished iteration, evaluated) and a reward-model run
    (offline examples, a reward model and its held-out accuracy). Returns the store's folder and, per row, how
    to run that stage again on a config (its input URIs relative to the store)."""
    root = tmp_path_factory.mktemp("stages")
    members = [str(build_tiny(root.parent / f"rm-{seed}", kind="reward_model", seed=seed, num_layers=2))
               for seed in (0, 1)]
    online = {
        "setup": "online_pairwise", "iterations": 2,
        "data": {"source": "bundled:prompts", "eval_prompts": 3},
        "generation": {"prompts_per_iteration": 4, "n_samples": 2, "max_new_tokens": 6},
        "annotation": {"annotator": "cascade", "reward_model": members, "cascade": {
            "first": "reward_model", "escalate_to": "programmatic", "budget": 0.5,
            "refresh": {"enabled": True, "epochs": 1}}},
        "training": {"epochs": 1, "batch_size": 4},
        "evaluation": {"max_new_tokens": 6},
        "store": {"root": str(root), "run_name": "online"},
    }
    data = root.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    offline = {
        "setup": "reward_modelling", "data": {"source": str(data), "eval_prompts": 2},
        "model": {"policy": members[0]}, "training": {"loss": "reward", "epochs": 1, "batch_size": 2},
        "store": {"root": str(root), "run_name": "offline"},
    }
    cfg = parse_config(online)
    policy = cfg.model.policy
    eval_prompts = pipeline.load_eval_prompts(cfg)
    prompts = pipeline.load_prompts(cfg, 1)
    iteration = online_iteration(cfg)
    generations, annotations, units, weights, checkpoint = (
        iteration[name] for name in ("generations", "annotations", "units", "weights", "checkpoint"))
    new = pipeline.generate(cfg, eval_prompts, checkpoint, 1, stage="eval_generations")
    initial = pipeline.generate(cfg, eval_prompts, policy, 0, stage="eval_generations")
    pipeline.evaluate_generations(cfg, new, initial, initial, 1)
    pipeline.refresh_reward_models(cfg, 2)
    rm_cfg = parse_config(offline)
    examples = pipeline.load_examples(rm_cfg)
    rm_units = pipeline.build_units(rm_cfg, 1, examples_uri=examples)
    rm = pipeline.train(rm_cfg, rm_units, pipeline.reweight(rm_cfg, rm_units, members[0], 1), members[0], members[0], 1)
    heldout = pipeline.heldout_examples_uri(pipeline.open_store(rm_cfg), examples)

    def at(uri: str):
        """A URI of this store as one relative to whichever copy a test runs on."""
        relative = uri.removeprefix(str(root))
        return lambda folder: f"{folder}{relative}"

    p, g, a, u, w, c, n, i = map(at, (prompts, generations, annotations, units, weights, checkpoint, new, initial))
    e, h, r, ep = map(at, (examples, heldout, rm, eval_prompts))
    runs = {  # row -> (the run's config, its iteration, how to run the stage on a copy of the store)
        "prompts": (online, 1, lambda cfg, f: pipeline.load_prompts(cfg, 1)),
        "eval_prompts": (online, 0, lambda cfg, f: pipeline.load_eval_prompts(cfg)),
        "generations": (online, 1, lambda cfg, f: pipeline.generate(cfg, p(f), policy, 1)),
        "eval_generations": (online, 1, lambda cfg, f: pipeline.generate(cfg, ep(f), c(f), 1,
                                                                          stage="eval_generations")),
        "annotations": (online, 1, lambda cfg, f: pipeline.annotate(cfg, g(f), 1)),
        "units": (online, 1, lambda cfg, f: pipeline.build_units(cfg, 1, generations_uri=g(f),
                                                                 annotations_uri=a(f))),
        "weights": (online, 1, lambda cfg, f: pipeline.reweight(cfg, u(f), policy, 1)),
        "checkpoint": (online, 1, lambda cfg, f: pipeline.train(cfg, u(f), w(f), policy, policy, 1)),
        "evaluation": (online, 1, lambda cfg, f: pipeline.evaluate_generations(cfg, n(f), i(f), i(f), 1)),
        "reward_models": (online, 2, lambda cfg, f: pipeline.refresh_reward_models(cfg, 2)),
        "examples": (offline, 0, lambda cfg, f: pipeline.load_examples(cfg)),
        "reward_model_evaluation": (offline, 1, lambda cfg, f: pipeline.evaluate_reward_model(cfg, h(f), r(f), 1)),
    }
    return root, runs


def store_copy(built, tmp_path):
    """A copy of the built store for one test (a test that redoes a stage must not change the others')."""
    root, runs = built
    folder = tmp_path / "store"
    shutil.copytree(root, folder)
    return str(folder), runs


def recorded(store, spec, uri: str) -> str:
    """The file that records a stage's copy (its manifest, or a checkpoint's lineage), as written."""
    name = "lineage.json" if spec.record == "lineage" else MANIFEST
    return json.dumps(store.read_json(f"{uri}/{name}"), sort_keys=True)


def ran_once(built, tmp_path, name: str):
    """The row's stage run again on a copy of the built store: (its spec, config, iteration, URI, store, whether
    its iteration is finished)."""
    folder, runs = store_copy(built, tmp_path)
    spec = STAGES[name]
    cfg, iteration, uri = run(runs, name, folder)
    store = pipeline.open_store(cfg)
    finished = store.checkpoint_complete(store.checkpoint_uri(cfg.store.run_name, max(iteration, 1)))
    return folder, runs, spec, uri, store, finished


def run(runs, name: str, folder: str, changes: dict | None = None):
    base, iteration, call = runs[name]
    cfg = parse_config(merged(merged(base, {"store": {"root": folder}}), changes or {}))
    return cfg, iteration, call(cfg, folder)


def test_every_row_of_the_table_is_run_here(built):
    assert set(built[1]) == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_an_unchanged_stage_is_skipped(built, tmp_path, name, caplog):
    folder, runs = store_copy(built, tmp_path)
    spec = STAGES[name]
    cfg, _, uri = run(runs, name, folder)
    store = pipeline.open_store(cfg)
    before = recorded(store, spec, uri)
    with caplog.at_level(logging.INFO, logger="alignment_core.runner"):
        assert run(runs, name, folder)[2] == uri
    assert f"{uri}: already complete" in caplog.text
    assert recorded(store, spec, uri) == before


@pytest.mark.parametrize("name", sorted(name for name, spec in STAGES.items() if spec.sections))
def test_a_changed_config_section_redoes_the_stage_or_refuses_to_rewrite_a_finished_iteration(built, tmp_path,
                                                                                               name):
    folder, runs, spec, uri, store, finished = ran_once(built, tmp_path, name)
    before = json.loads(recorded(store, spec, uri))["fingerprint"]
    changes = SECTION_CHANGES[CHANGED_SECTION.get(name, spec.sections[0])]
    if spec.keeps_finished and finished:
        with pytest.raises(FinishedIterationChangedError, match="the config changed"):
            run(runs, name, folder, changes)
        assert json.loads(recorded(store, spec, uri))["fingerprint"] == before
    else:
        assert run(runs, name, folder, changes)[2] == uri
        after = json.loads(recorded(store, spec, uri))["fingerprint"]
        assert after["config"] != before["config"] and after["inputs"] == before["inputs"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_new_library_code_keeps_a_finished_iterations_stage_and_redoes_the_rest(built, tmp_path, name,
                                                                                  monkeypatch):
    folder, runs, spec, uri, store, finished = ran_once(built, tmp_path, name)
    before = recorded(store, spec, uri)
    monkeypatch.setattr(runner, "stage_code_digest", lambda stage: f"upgraded-{stage}")  # an upgrade
    assert run(runs, name, folder)[2] == uri
    after = recorded(store, spec, uri)
    if spec.keeps_finished and finished:
        assert after == before
    else:
        assert json.loads(after)["fingerprint"]["code"] == f"upgraded-{name}"
