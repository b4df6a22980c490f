"""InputRef: each kind of input (stage output; model: tiny build, store checkpoint, local folder, hub id at a
revision) classified, resolved and digested by its own rule, with errors that name the kind that was meant."""

import json

import pytest

from alignment_core import pipeline
from alignment_core.config import parse_config
from alignment_core.inputs import InputRef, ModelNotFoundError, StageNotFinishedError
from alignment_core.models import load_causal_lm, load_tokenizer, model_digest
from alignment_core.records import PROMPTS
from alignment_core.store import ArtifactStore
from tests.conftest import POLICY_REVISION
from tests.test_hub_models import hub_cache  # noqa: F401  (fixture)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))


def test_each_form_of_name_is_one_kind(tmp_path, store):
    folder = tmp_path / "model"
    folder.mkdir()
    kinds = {
        "tiny://llama": "tiny", "tiny://reward": "tiny",
        "s3://bucket/run/iter-001/checkpoint": "checkpoint", "file:///somewhere/checkpoint": "checkpoint",
        "memory://store/run/iter-002/checkpoint": "checkpoint",
        str(folder): "local", "./nope": "local", "/no/such/folder": "local", "~/nope": "local", "a/b/c": "local",
        "org/name": "hub", "gpt2": "hub", f"org/name@{POLICY_REVISION}": "hub", "org/name@v1.0": "hub",
    }
    assert {name: InputRef.model(name).kind for name in kinds} == kinds
    assert (InputRef.model("org/name@v1.0").repo, InputRef.model("org/name@v1.0").revision) == ("org/name", "v1.0")
    assert InputRef.model("org/name").revision is None and InputRef.model(str(folder)).revision is None
    # A URI alone: laid out as a stage of the store (manifest or not) is a stage; a checkpoint is a model.
    assert InputRef.of(store, store.stage_uri("run", 1, "units")) == InputRef.stage(store.stage_uri("run", 1, "units"))
    assert InputRef.of(store, store.checkpoint_uri("run", 1)).kind == "local"  # a model: a local store's folder
    assert InputRef.of(store, "tiny://llama") == InputRef("tiny", "tiny://llama")
    assert InputRef.of(store, "org/name@v1").kind == "hub"


def test_a_stage_output_without_manifest_says_the_stage_did_not_finish(store, tmp_path):
    """Before InputRef, such a URI was taken for a model: "model path ... does not exist" or, once the stage
    had started, "no .safetensors files in ..."."""
    units = store.stage_uri("run", 1, "units")
    def named_by_uri_alone(store, uri):  # the kind decided from the URI (`InputRef.of`), not said by the caller
        return InputRef.of(store, uri).digest(store)

    for digest in (named_by_uri_alone, pipeline.stage_digest):
        with pytest.raises(StageNotFinishedError, match=rf"stage output {units} has no manifest \(the stage did not"):
            digest(store, units)
    writer = store.stage_writer(units, "prompts", {"stage": "units"})  # started: _stage.json, one shard
    writer.write_shard(0, PROMPTS.empty_table())
    with pytest.raises(StageNotFinishedError, match="has no manifest"):
        named_by_uri_alone(store, units)
    writer.finish()
    manifest = store.read_manifest(units)
    assert named_by_uri_alone(store, units) == pipeline.stage_digest(store, units) == manifest["fingerprint_digest"]
    with pytest.raises(ValueError, match="is a stage's rows, not a model folder"):
        InputRef.stage(units).resolve(store)


def test_a_stage_reading_an_unfinished_input_names_it_before_any_work(tmp_path):
    cfg = parse_config({"setup": "offline_pairwise",
                        "store": {"root": str(tmp_path / "store"), "run_name": "r", "cache_dir": str(tmp_path / "c")}})
    store = pipeline.open_store(cfg)
    units = store.stage_uri("r", 1, "units")
    with pytest.raises(StageNotFinishedError, match=rf"stage output {units} has no manifest"):
        pipeline.reweight(cfg, units, "tiny://llama", 1)
    assert not store.exists(store.stage_uri("r", 1, "weights"))


def test_tiny_build_resolves_into_the_cache_and_digests_its_weights(store, tmp_path):
    ref = InputRef.model("tiny://llama")
    path = ref.resolve(store)
    assert path == str(tmp_path / "cache" / "tiny-llama")  # the store's cache folder
    assert ref.digest(store) == pipeline.model_input_digest(store, "tiny://llama") == model_digest(path)
    assert ref.lineage(store) == {"name": "tiny://llama", "digest": model_digest(path), "hub_revision": None}
    assert InputRef.model("tiny://reward").resolve(cache_dir=tmp_path / "other") == str(tmp_path / "other/tiny-reward")


def test_store_checkpoint_resolves_to_its_finished_copy(store, tiny_model_dir):
    uri = store.checkpoint_uri("run", 1)
    store.save_checkpoint(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), uri)
    ref = InputRef.model("file://" + uri)
    assert ref.kind == "checkpoint" and ref.digest() == ref.digest(store) == model_digest(tiny_model_dir)
    assert pipeline.model_lineage(store, "file://" + uri) == {
        "name": "file://" + uri, "digest": model_digest(tiny_model_dir), "hub_revision": None}
    unfinished = "file://" + store.checkpoint_uri("run", 2)
    with pytest.raises(ModelNotFoundError, match=rf"model '{unfinished}' \(store checkpoint\): .*incomplete"):
        pipeline.model_input_digest(store, unfinished)


def test_local_folder_errors_name_the_kind(store, tmp_path, tiny_model_dir):
    assert pipeline.model_input_digest(store, str(tiny_model_dir)) == model_digest(tiny_model_dir)
    assert pipeline.resolve_model(store, str(tiny_model_dir)) == str(tiny_model_dir)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match=rf"model '{missing}' \(local folder\) does not exist"):
        pipeline.model_input_digest(store, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=rf"model '{empty}' \(local folder\): no .safetensors files"):
        pipeline.model_input_digest(store, str(empty))


def test_hub_id_at_a_revision_is_its_snapshot_and_commit(store, hub_cache):  # noqa: F811
    pinned = InputRef.model(f"acme/tiny-chat@{POLICY_REVISION}")
    assert (pinned.kind, pinned.repo, pinned.revision) == ("hub", "acme/tiny-chat", POLICY_REVISION)
    path = pinned.resolve(store)
    assert path.endswith(f"models--acme--tiny-chat/snapshots/{POLICY_REVISION}")
    assert InputRef.model("acme/tiny-chat").resolve(store) == path  # refs/main names the same commit
    assert pinned.digest(store) == model_digest(path)
    lineage = pipeline.model_lineage(store, f"acme/tiny-chat@{POLICY_REVISION}")
    assert lineage == {"name": f"acme/tiny-chat@{POLICY_REVISION}", "digest": model_digest(path),
                       "hub_revision": POLICY_REVISION}
    with pytest.raises(ModelNotFoundError, match=r"hub model 'acme/absent'"):
        pipeline.model_input_digest(store, "acme/absent")
    with pytest.raises(ModelNotFoundError, match=r"'acme/tiny-chat' has no revision|--revision v9"):
        InputRef.model("acme/tiny-chat@v9").resolve(store)
    assert "hub id at revision v9" in InputRef.model("acme/tiny-chat@v9").describe()


def test_labels_digest_of_a_retried_stage_is_part_of_its_digest(store):
    annotations = store.stage_uri("run", 1, "annotations")
    store.write_stage(annotations, "prompts", {"stage": "annotations"}, [PROMPTS.empty_table()],
                      extra={"labels_digest": "abc"})
    manifest = json.loads(open(f"{annotations}/_manifest.json").read())
    assert pipeline.stage_digest(store, annotations) == manifest["fingerprint_digest"] + "+abc"
