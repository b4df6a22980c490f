"""SIGKILL in annotate, reweight and evaluate: the pipeline's stages in a process of their own (no Prefect:
tests/test_flows.py kills a whole flow run mid-generation), killed just before a chosen write, then run again:
the rerun keeps what was finished and ends with the rows of a run that was never interrupted."""

from pathlib import Path

import pandas as pd
import pytest

from alignment_core import pipeline
from alignment_core.config import parse_config
from alignment_core.store import ArtifactStore
from tests.conftest import fault_note
from tests.faults.helpers import kill_when_ready, run_worker, start_worker


def stages_config(root: str, model_dir: str):
    """8 prompts x 2 samples in 4 generation shards, 4 held-out prompts in 2 shards: shards to kill between."""
    return parse_config({
        "setup": "online_pairwise", "data": {"source": "bundled:prompts", "eval_prompts": 4},
        "model": {"policy": model_dir},
        "generation": {"backend": "transformers", "prompts_per_iteration": 8, "n_samples": 2, "max_new_tokens": 8,
                       "shard_size": 2, "batch_size": 8},
        "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:positive_words"},
        "reweight": {"strategy": "margin"},
        "evaluation": {"max_new_tokens": 8, "oracle": "alignment_core.rewards:positive_words"},
        "store": {"root": root, "run_name": "kill"},
    })


def run_stages(root: str, model_dir: str, through: str) -> None:
    """Iteration 1 without training, `through` reweight (prompts, generate, annotate, units, reweight) or
    evaluate (then the policy's evaluation too)."""
    cfg = stages_config(root, model_dir)
    generations = pipeline.generate(cfg, pipeline.load_prompts(cfg, 1), model_dir, 1)
    annotations = pipeline.annotate(cfg, generations, 1)
    units = pipeline.build_units(cfg, 1, generations_uri=generations, annotations_uri=annotations)
    pipeline.reweight(cfg, units, model_dir, 1)
    if through == "evaluate":
        pipeline.evaluate(cfg, pipeline.load_eval_prompts(cfg), model_dir, model_dir, model_dir, 1)


# stage killed -> (the write it is killed before, the stages whose rows must equal the uninterrupted run's, the
# last stage run: evaluation does not read what annotate and reweight write, so their runs stop before it)
KILLS = {
    "annotate": ("annotations/part-00002.parquet", ["annotations", "units", "weights"], "reweight"),
    "reweight": ("weights/_manifest.json", ["weights"], "reweight"),
    "evaluate": ("eval_generations/part-00001.parquet", ["eval_generations", "evaluation"], "evaluate"),
}
SORT_KEYS = {"annotations": "annotation_id", "units": "unit_id", "weights": "unit_id",
             "eval_generations": "generation_id", "evaluation": "metric"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> ArtifactStore:
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    run_stages(root, str(tiny_model_dir), through="evaluate")
    return ArtifactStore(root)


def rows(store: ArtifactStore, stage: str) -> pd.DataFrame:
    frame = store.read_pandas(store.stage_uri("kill", 1, stage))
    return frame.sort_values(SORT_KEYS[stage]).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.fault("SIGKILL mid-stage")
@pytest.mark.parametrize("stage", list(KILLS))
def test_a_stage_killed_midway_resumes_to_the_rows_of_an_uninterrupted_run(request, stage, tmp_path,
                                                                            tiny_model_dir, uninterrupted):
    before, compared, through = KILLS[stage]
    root, ready = tmp_path / "store", tmp_path / "ready"
    kill_when_ready(start_worker("stages", str(root), str(tiny_model_dir), "--through", through,
                                 "--stall-before", f"iter-001/{before}", "--ready", str(ready)), ready)
    store = ArtifactStore(str(root))
    folder = Path(store.stage_uri("kill", 1, before.split("/")[0]))
    assert not (folder / "_manifest.json").exists()  # killed mid-stage
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert finished  # a shard was written before the kill ...

    run_worker("stages", str(root), str(tiny_model_dir), "--through", through)
    assert {name: (folder / name).stat().st_mtime_ns for name in finished} == finished  # ... and kept
    for name in compared:
        pd.testing.assert_frame_equal(rows(store, name), rows(uninterrupted, name), obj=name)
    fault_note(request, f"killed before {before} ({len(finished)} shard(s) written); the rerun kept them and "
                        f"matched the uninterrupted {', '.join(compared)}")
