"""SIGKILL mid-checkpoint-save: the previous checkpoint stays live, whole and loadable; the next save cleans up.

On object storage a save uploads beside the live version and switches the pointer last; locally it swaps
folders. The worker process stalls after a few of the new checkpoint's files are written and is killed there.
"""

import json
from pathlib import Path

import pytest
import torch

from alignment_core.models import load_causal_lm, load_tokenizer
from alignment_core.store import CHECKPOINT_POINTER, ArtifactStore
from tests.conftest import fault_note
from tests.faults.helpers import kill_when_ready, start_worker


def saved_step(store: ArtifactStore, uri: str) -> int:
    return json.loads(Path(store.local_checkpoint(uri), "trainer_state.json").read_text())["step"]


def weights_shifted_by(store: ArtifactStore, uri: str, model_dir, step: int) -> bool:
    base, saved = load_causal_lm(str(model_dir)).state_dict(), load_causal_lm(store.local_checkpoint(uri)).state_dict()
    return all(torch.equal(saved[name], value + step) for name, value in base.items())


@pytest.mark.fault("SIGKILL mid-checkpoint-upload")
@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_live(where, request, tmp_path, tiny_model_dir):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        root, env = f"s3://artifacts/killed-save-{tmp_path.name}", {"AWS_ENDPOINT_URL": endpoint}
    else:
        root, env = str(tmp_path / "store"), {}
    cache = str(tmp_path / "cache")
    store = ArtifactStore(root, endpoint_url=env.get("AWS_ENDPOINT_URL"), cache_dir=cache)
    uri = store.checkpoint_uri("r", 1)
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
    store.save_checkpoint(model, load_tokenizer(str(tiny_model_dir)), uri,
                          extra_files={"trainer_state.json": b'{"step": 1}'})
    assert saved_step(store, uri) == 1

    ready = tmp_path / "ready"
    worker = start_worker("save", root, uri, str(tiny_model_dir), "--step", "2", "--stall-after", "3",
                          "--ready", str(ready), "--cache", cache, env=env)
    kill_when_ready(worker, ready)

    # The killed save wrote 3 files of the new checkpoint somewhere; the previous one is still the checkpoint.
    if where == "s3":
        listing = store.fs.ls(store._path(uri), detail=False)
        versions = sorted(p.rsplit("/", 1)[-1] for p in listing if p.rsplit("/", 1)[-1] != CHECKPOINT_POINTER)
        live = store.read_json(f"{uri}/{CHECKPOINT_POINTER}")["version"]
        [partial] = [v for v in versions if v != live]
        assert len(store.fs.find(store._path(f"{uri}/{partial}"))) == 3
    else:
        [partial] = [p.name for p in Path(uri).parent.iterdir() if p.name.startswith(".checkpoint.")]
        assert len(list(Path(uri).parent.joinpath(partial).iterdir())) == 3
        assert store.list_stages("r", 1) == ["checkpoint"]  # the leftover is never shown as a stage
    assert store.checkpoint_complete(uri)
    fresh = ArtifactStore(root, endpoint_url=env.get("AWS_ENDPOINT_URL"), cache_dir=str(tmp_path / "cache2"))
    assert saved_step(fresh, uri) == 1 and weights_shifted_by(fresh, uri, tiny_model_dir, 1)

    # The next save replaces the checkpoint and removes what the killed one left.
    store.save_checkpoint(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), uri,
                          extra_files={"trainer_state.json": b'{"step": 3}'})
    assert store.checkpoint_complete(uri) and saved_step(store, uri) == 3
    assert weights_shifted_by(store, uri, tiny_model_dir, 0)
    if where == "s3":
        store.fs.invalidate_cache()
        names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store._path(uri), detail=False))
        live = store.read_json(f"{uri}/{CHECKPOINT_POINTER}")["version"]
        assert names == sorted([CHECKPOINT_POINTER, live]) and partial not in names
    else:
        assert sorted(p.name for p in Path(uri).parent.iterdir()) == ["checkpoint"]
    fault_note(request, f"killed after 3 files of the new save; leftover {partial[:12]}... removed by the next save")
