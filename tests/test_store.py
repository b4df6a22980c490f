import json
import os

import pandas as pd
import pyarrow as pa
import pytest

from alignment_core.records import SchemaError
from alignment_core.store import ArtifactStore, fingerprint_digest
from tests.helpers import metrics_table


def test_stage_round_trip_and_manifest(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.stage_uri("run-a", 1, "metrics")
    fingerprint = {"config": "abc", "inputs": ["x"]}
    manifest = store.write_stage(uri, "metrics", fingerprint, [metrics_table(0, 3), metrics_table(3, 2)])

    assert manifest["rows"] == 5
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest["fingerprint_digest"] == fingerprint_digest(fingerprint)
    assert store.is_complete(uri, fingerprint)
    assert not store.is_complete(uri, {"config": "other"})
    assert store.read_pandas(uri)["step"].tolist() == [0, 1, 2, 3, 4]
    # Users open a stage folder with plain pandas.
    assert len(pd.read_parquet(uri)) == 5
    assert uri.endswith("/root/run-a/iter-001/metrics")
    assert store.list_runs() == ["run-a"]
    assert store.list_iterations("run-a") == [1]
    assert store.list_stages("run-a", 1) == ["metrics"]


def test_resume_keeps_shards_of_same_fingerprint_and_clears_others(tmp_path):
    store = ArtifactStore(str(tmp_path))
    uri = store.stage_uri("r", 0, "metrics")
    writer = store.stage_writer(uri, "metrics", {"v": 1})
    writer.write_shard(0, metrics_table(0, 2))
    # "killed" here: no manifest, so the stage is not complete
    assert store.read_manifest(uri) is None
    with pytest.raises(FileNotFoundError, match="not complete"):
        store.read_table(uri)

    resumed = store.stage_writer(uri, "metrics", {"v": 1})
    assert resumed.done_shards == {0}
    with pytest.raises(RuntimeError, match=r"shards \[1\] are missing"):
        resumed.write_shard(2, metrics_table(4, 1))
        resumed.finish()

    changed = store.stage_writer(uri, "metrics", {"v": 2})
    assert changed.done_shards == set()
    assert not any(name.startswith("part-") for name in os.listdir(uri))


def test_wrong_schema_names_the_column(tmp_path):
    store = ArtifactStore(str(tmp_path))
    writer = store.stage_writer(store.stage_uri("r", 0, "metrics"), "metrics", {})
    bad = pa.table({"step": ["one"], "split": ["train"], "metric": ["loss"], "value": [1.0]})
    with pytest.raises(SchemaError, match="'step'"):
        writer.write_shard(0, bad)
    with pytest.raises(SchemaError, match="unexpected column 'extra'"):
        writer.write_shard(0, metrics_table(0, 1).append_column("extra", pa.array([1])))


def test_no_temporary_files_left_and_json_is_atomic(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write_json(store.uri("a", "doc.json"), {"k": 1})
    store.write_json(store.uri("a", "doc.json"), {"k": 2})
    assert os.listdir(tmp_path / "a") == ["doc.json"]
    assert json.loads((tmp_path / "a" / "doc.json").read_text()) == {"k": 2}


def test_checkpoint_save_load_and_replace(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ArtifactStore(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    uri = store.checkpoint_uri("r", 1)
    assert not store.checkpoint_complete(uri)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        store.local_checkpoint(uri)
    store.save_checkpoint(model, tokenizer, uri, extra_files={"trainer_state.json": b'{"step": 3}'})
    store.save_checkpoint(model, tokenizer, uri, extra_files={"trainer_state.json": b'{"step": 4}'})
    local = store.local_checkpoint(uri)
    assert any(name.endswith(".safetensors") for name in os.listdir(local))
    assert json.loads(open(os.path.join(local, "trainer_state.json")).read()) == {"step": 4}
    reloaded = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert not [n for n in os.listdir(os.path.dirname(local)) if n.startswith(".")]


@pytest.mark.slow
def test_s3_store_against_loopback_server(s3_server, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ArtifactStore("s3://artifacts/prefix", endpoint_url=s3_server, cache_dir=str(tmp_path / "cache"))
    uri = store.stage_uri("run-s3", 0, "metrics")
    assert uri == "s3://artifacts/prefix/run-s3/iter-000/metrics"
    store.write_stage(uri, "metrics", {"v": 1}, [metrics_table(0, 4)])
    frame = pd.read_parquet(uri + "/", storage_options=store.storage_options)
    assert sorted(frame["step"]) == [0, 1, 2, 3]
    assert store.list_runs() == ["run-s3"]
    assert store.list_stages("run-s3", 0) == ["metrics"]

    ckpt = store.checkpoint_uri("run-s3", 0)
    store.save_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          AutoTokenizer.from_pretrained(tiny_model_dir), ckpt)
    local = store.local_checkpoint(ckpt)
    assert AutoModelForCausalLM.from_pretrained(local).config.hidden_size > 0


def test_a_stage_read_into_pandas_and_written_again_keeps_its_integer_nulls(tmp_path):
    """pandas holds an integer column with nulls as floats (NaN for null): written back, NaN is null again, a
    whole float is its integer, and a fraction or a NaN where nulls are not allowed is still refused."""
    from alignment_core.records import GENERATIONS, from_rows

    row = {"generation_id": "g", "prompt_id": "p", "prompt": "q", "prompt_messages": [], "sample_index": 0,
           "response": "r", "response_token_ids": [1], "finish_reason": "stop", "policy_uri": "m",
           "policy_digest": "d", "sampling_params": "{}", "seed": 1, "backend": "transformers"}
    frame = from_rows([{**row, "staleness": 1}, {**row, "generation_id": "h"}], GENERATIONS).to_pandas()
    assert frame["staleness"].dtype == "float64" and frame["staleness"].isna().tolist() == [False, True]
    again = from_rows(frame.to_dict("records"), GENERATIONS)
    assert again.column("staleness").to_pylist() == [1, None] and again.schema == GENERATIONS
    with pytest.raises(SchemaError, match="'staleness'"):
        from_rows([{**row, "staleness": 1.5}], GENERATIONS)
    with pytest.raises(SchemaError, match="'sample_index' has 1 null"):
        from_rows([{**row, "sample_index": float("nan")}], GENERATIONS)
