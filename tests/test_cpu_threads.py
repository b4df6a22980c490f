"""CPU threads: OpenMP threads wait passively, and each stage runs with model.torch_threads in its own thread."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from alignment_core import pipeline
from alignment_core.config import PipelineConfig
from alignment_core.cpu import torch_threads, usable_cpus

REPO = Path(__file__).resolve().parent.parent


def openmp_settings(env: dict) -> str:
    """libgomp's own report (OMP_DISPLAY_ENV, on stderr) of the settings it read when torch loaded it, in a
    process that imports alignment_core first, as our entry points do."""
    done = subprocess.run([sys.executable, "-c", "import alignment_core, torch"],
                          env={**env, "PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "verbose"},
                          capture_output=True, text=True, check=True)
    return done.stderr


def test_openmp_threads_wait_passively_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    # The spin count is what libgomp does: 0 passive, 300000 with no policy set (it then reports PASSIVE too).
    assert "GOMP_SPINCOUNT = '0'" in openmp_settings(env)
    active = openmp_settings({**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in active and "GOMP_SPINCOUNT = '0'" not in active


def test_usable_cpus_follow_a_cgroup_quota(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")  # half a CPU: one thread
    assert usable_cpus(str(quota)) == 1
    quota.write_text(f"{100000 * cpus + 1} 100000\n")  # more than the affinity allows: the affinity
    assert usable_cpus(str(quota)) == cpus
    quota.write_text("max 100000\n")
    assert usable_cpus(str(quota)) == cpus
    assert usable_cpus(str(tmp_path / "absent")) == cpus


def test_torch_threads_configured_or_left_to_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads(3) == 3
    assert torch_threads(None) == usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert torch_threads(None) is None  # torch already follows it
    assert torch_threads(3) == 3


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_stages_run_with_the_configured_threads_in_their_own_thread(tmp_path, tiny_model_dir, tiny_reward_model_dir,
                                                                     restore_torch_threads):
    """Prefect runs a stage in a worker thread; OpenMP's thread count is per calling thread, so the count must be
    set there: the stages' manifests record what torch used where they ran. 3 is neither torch's default here
    nor what the main thread uses."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(4)))
    cfg = PipelineConfig.model_validate({
        "data": {"source": str(prompts), "format": "prompt_only", "eval_prompts": 0},
        "model": {"policy": str(tiny_model_dir), "torch_threads": 3},
        "generation": {"backend": "transformers", "prompts_per_iteration": 4, "max_new_tokens": 4},
        "annotation": {"annotator": "reward_model", "reward_model": str(tiny_reward_model_dir)},
        "store": {"root": str(tmp_path / "store"), "run_name": "threads"},
    })
    torch.set_num_threads(1)
    outputs = {}

    def stages():
        uri = pipeline.load_prompts(cfg, 1)
        outputs["generations"] = pipeline.generate(cfg, uri, cfg.model.policy, 1)
        outputs["annotations"] = pipeline.annotate(cfg, outputs["generations"], 1)

    worker = threading.Thread(target=stages)
    worker.start()
    worker.join()
    store = pipeline.open_store(cfg)
    assert store.read_manifest(outputs["generations"])["extra"]["torch_threads"] == 3
    assert store.read_manifest(outputs["annotations"])["extra"]["torch_threads"] == 3
