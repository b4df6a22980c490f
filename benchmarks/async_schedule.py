"""Asynchronous iterations (`scale_out.schedule: async`) against synchronous ones, on this machine, and simulated.

Measured: `--iterations` (4) online iterations of `--prompts` (256) prompts each, the demo's task (configs/demo.yaml:
tiny://llama-sft, the bundled prompts, the `positive_words` true reward as the programmatic annotator, best vs
worst of 2 samples of at most 24 tokens, DPO lr 1e-3), evaluation off during the run. Three systems, each a fresh
orchestrating process, alternating over `--repeats`:

- sync-local: `python -m flows.iterative_dpo` in ephemeral Prefect, every stage in that process (both cores):
  what a user runs on one machine.
- sync-workers: the same flow against a real `prefect server start`, generate and train dispatched to the
  stage deployments of deployments/prefect.yaml on a process pool with two workers, `taskset -c 0` and
  `taskset -c 1` (one core each): what dispatching alone costs.
- async-workers: the same workers, `scale_out.schedule: async, max_staleness: 1`: iteration k+1 samples (from
  the checkpoint of iteration k-1) while iteration k trains.

Printed per run: wall time, and for the worker systems each dispatched flow run's wait (created to started:
picking it up and starting its process, imports included) and body (started to ended). After each run the final
checkpoint answers the 40 held-out prompts 4 times (temperature 0.7, the same seeds for every system), scored
by the true reward: the quality of what each schedule trained.

Simulated, from the sync-local run's stage times (task runs in its Prefect database: generate G, annotate A,
train T per iteration) and the workers' mean dispatch wait D: N GPUs, sync runs each stage on all N in turn
(generate and annotate fanned out, training data-parallel at efficiency E = 0.9), D paid by the two dispatched
stages: G/N + A/N + T/(N E) + 2D a iteration. Async splits the N GPUs into n for sampling and N - n for training
and runs them side by side: max(G/n + A/n + D, T/((N - n) E) + D) a iteration at the best n. One sampling
pipeline (fanned out over its n GPUs) keeps ahead of training with a staleness of 1; a larger max_staleness
only absorbs variance.

    python benchmarks/async_schedule.py [--iterations 4] [--prompts 256] [--repeats 1]
"""

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.online_iteration import base_env  # noqa: E402

SYSTEMS = ("sync-local", "sync-workers", "async-workers")
EFFICIENCY = 0.9  # data-parallel training efficiency assumed by the simulation
HELDOUT_SAMPLES, HELDOUT_TEMPERATURE = 4, 0.7


def config(root: Path, cache: Path, iterations: int, prompts: int, system: str) -> dict:
    cfg = {
        "setup": "online_pairwise", "iterations": iterations,
        "data": {"source": "bundled:prompts", "eval_prompts": 40},
        "model": {"policy": "tiny://llama-sft"},
        "generation": {"backend": "transformers", "prompts_per_iteration": prompts, "n_samples": 2,
                       "temperature": 1.0, "max_new_tokens": 24, "seed": 0},
        "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:positive_words",
                       "pair_selection": "best_vs_worst"},
        "training": {"loss": "dpo", "beta": 0.1, "learning_rate": 1e-3, "batch_size": 8, "seed": 0},
        "evaluation": {"enabled": False},
        "store": {"root": str(root), "run_name": "bench", "cache_dir": str(cache)},
    }
    if system != "sync-local":
        cfg["scale_out"] = {"generate_deployment": "generate-stage/gpu", "train_deployment": "train-stage/gpu",
                            "schedule": "async" if system == "async-workers" else "sync", "max_staleness": 1}
    return cfg


def heldout_reward(root: Path, cache: Path, iterations: int, prompts: int) -> float:
    """The final checkpoint's mean true reward on the held-out prompts (HELDOUT_SAMPLES answers each); with
    `iterations` 0, the initial policy's."""
    from alignment_core import pipeline
    from alignment_core.config import parse_config
    from alignment_core.rewards import positive_words

    cfg = parse_config(config(root, cache, max(iterations, 1), prompts, "sync-local"))
    cfg = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={
        "n_samples": HELDOUT_SAMPLES, "temperature": HELDOUT_TEMPERATURE})})
    store = pipeline.open_store(cfg)
    checkpoint = store.checkpoint_uri("bench", iterations) if iterations else cfg.model.policy
    samples = pipeline.generate(cfg, pipeline.load_eval_prompts(cfg), checkpoint, iterations, stage="heldout")
    rows = store.read_pandas(samples)
    return float(statistics.mean(positive_words(p, r) for p, r in zip(rows["prompt"], rows["response"],
                                                                         strict=True)))


def task_stage_seconds(prefect_home: Path) -> dict[str, float]:
    """Mean seconds per iteration of generate, annotate and train, from an ephemeral run's task runs."""
    db = sqlite3.connect(prefect_home / "prefect.db")
    rows = db.execute("select name, start_time, end_time from task_run where state_type = 'COMPLETED'").fetchall()
    seconds: dict[str, list[float]] = {}
    for name, start, end in rows:
        stage = name.split("-iter-")[0]
        if stage in ("generate", "annotate", "train") and start and end:
            seconds.setdefault(stage, []).append(
                (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    return {stage: statistics.mean(values) for stage, values in seconds.items()}


def dispatched_runs(api: str, root: Path) -> list[dict]:
    """Each stage flow run of the run under `root`: its name, wait (created to started) and body (started to
    ended) in seconds."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    found = []
    for run in sorted(runs, key=lambda r: r.created):
        if str(root) in (run.parameters or {}).get("config_json", "") and run.start_time and run.end_time:
            found.append({"name": run.name, "wait": (run.start_time - run.created).total_seconds(),
                          "body": (run.end_time - run.start_time).total_seconds()})
    return found


def simulate(g: float, a: float, t: float, d: float) -> list[tuple]:
    table = []
    for gpus in (2, 4, 8):
        sync = g / gpus + a / gpus + t / (gpus * EFFICIENCY) + 2 * d
        split, period = min(((n, max((g + a) / n + d, t / ((gpus - n) * EFFICIENCY) + d)) for n in range(1, gpus)),
                            key=lambda pair: pair[1])
        table.append((gpus, f"{split}+{gpus - split}", sync, period, sync / period))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    from tests.test_deployment import running_prefect_server

    # Under runs/: a folder the stage deployments' allow-list (deployments/prefect.yaml) lets a config reach.
    (REPO / "runs").mkdir(exist_ok=True)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="async-schedule-", dir=REPO / "runs")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "models"
    from alignment_core.models import resolve_model_path

    resolve_model_path("tiny://llama-sft", cache_dir=str(cache))  # built once, before any timed run
    print(f"{args.iterations} iterations of {args.prompts} prompts; load {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores", flush=True)
    initial = heldout_reward(workdir / "initial", cache, 0, args.prompts)
    print(f"held-out true reward of the initial policy: {initial:.2f}", flush=True)
    results: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
    stage_seconds: dict[str, float] = {}
    with running_prefect_server(workdir) as (api, server_env):
        env = {**server_env, "ALIGNMENT_CORE_HOME": str(REPO), "PYTHONPATH": str(REPO),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        for command in (("work-pool", "create", "gpu", "--type", "process"),
                        ("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                         "generate-stage/gpu", "--name", "train-stage/gpu")):
            subprocess.run([sys.executable, "-m", "prefect", *command], cwd=REPO, env=env, check=True,
                           capture_output=True, timeout=300)
        workers = [subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-m", "prefect", "worker", "start",
                                     "--pool", "gpu", "--limit", "1", "--name", f"core-{core}"], cwd=REPO, env=env,
                                    stdout=open(workdir / f"worker-{core}.log", "w"), stderr=subprocess.STDOUT,
                                    start_new_session=True) for core in (0, 1)]
        try:
            for repeat in range(args.repeats):
                order = SYSTEMS[repeat % 3:] + SYSTEMS[:repeat % 3]
                for system in order:
                    root = workdir / f"{system}-{repeat}"
                    path = workdir / f"{system}-{repeat}.yaml"
                    path.write_text(yaml.safe_dump(config(root, cache, args.iterations, args.prompts, system)))
                    run_env = env
                    if system == "sync-local":  # ephemeral Prefect, its own database
                        run_env = base_env(workdir / f"local-{repeat}")
                        Path(run_env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
                    started = time.time()
                    done = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(path)],
                                          cwd=REPO, env=run_env, capture_output=True, text=True)
                    wall = time.time() - started
                    if done.returncode:
                        raise SystemExit(f"{system}: exit {done.returncode}\n{done.stdout[-3000:]}"
                                         f"{done.stderr[-3000:]}")
                    result = {"wall": wall, "reward": heldout_reward(root, cache, args.iterations, args.prompts)}
                    if system == "sync-local":
                        stage_seconds = task_stage_seconds(workdir / f"local-{repeat}" / "prefect-home")
                        result["stages"] = stage_seconds
                    else:
                        result["runs"] = dispatched_runs(api, root)
                    results[system].append(result)
                    print(f"{system:13s} repeat {repeat}: {wall:6.1f} s wall, held-out true reward "
                          f"{result['reward']:.2f}", flush=True)
                    for run in result.get("runs", []):
                        print(f"    {run['name']:18s} wait {run['wait']:5.1f} s  body {run['body']:5.1f} s")
                    if "stages" in result:
                        print("    stages per iteration: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                      result["stages"].items()))
        finally:
            for worker in workers:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:  # a Prefect worker can outwait SIGTERM
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()

    print(f"\n{'system':13s} {'wall s, median [min-max]':28s} held-out true reward")
    walls = {system: statistics.median(r["wall"] for r in runs) for system, runs in results.items()}
    for system, runs in results.items():
        values = [r["wall"] for r in runs]
        print(f"{system:13s} {walls[system]:6.1f} [{min(values):.1f}-{max(values):.1f}]{'':14s}"
              f"{statistics.median(r['reward'] for r in runs):.2f}")
    print(f"async-workers' speed: {walls['sync-workers'] / walls['async-workers']:.2f}x sync-workers', "
          f"{walls['sync-local'] / walls['async-workers']:.2f}x sync-local's")
    waits = [run["wait"] for runs in results.values() for r in runs for run in r.get("runs", [])]
    d = statistics.mean(waits)
    g, a, t = (stage_seconds.get(stage, 0.0) for stage in ("generate", "annotate", "train"))
    print(f"\nsimulation (G {g:.1f} s, A {a:.1f} s, T {t:.1f} s per iteration, dispatch wait D {d:.1f} s, "
          f"data-parallel efficiency {EFFICIENCY}):")
    print("GPUs  sampling+training  sync s/iter  async s/iter  speedup  (staleness 1: one sampling pipeline)")
    for gpus, split, sync, period, speedup in simulate(g, a, t, d):
        print(f"{gpus:4d}  {split:17s}  {sync:11.1f}  {period:12.1f}  {speedup:6.2f}x")
    (workdir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
