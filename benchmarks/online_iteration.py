"""One online iteration end to end: this project's flow against TRL's OnlineDPOTrainer, each in a fresh process.

Both do the same work on the same inputs: the tiny Llama (hidden 256, 4 layers) samples 2 responses per prompt
(temperature 1, top-p 1, no top-k, at most 24 new tokens), the tiny reward model
(`tiny://reward`, the same folder for both) scores them, the better one of each pair is chosen, and one epoch of
sigmoid DPO (beta 0.1, lr 5e-6, linear schedule without warm-up, batch 8 pairs, AdamW, max grad norm 1, fp32)
trains the policy against a frozen copy of itself, which is then saved to local disk. No gradient checkpointing
in either (TRL's configs default to it, and OnlineDPOTrainer then also samples without a KV cache: at 1024
prompts that made TRL's run over three times slower than ours, an unequal comparison).

- ours: `python -m flows.iterative_dpo --config <yaml> --iterations 1` (ephemeral Prefect, transformers backend,
  reward-model annotator, store on local disk, evaluation off, uniform weights), with the shipped batching:
  generation.batch_size, shard_size and annotation.batch_size unset (the stage sizes its batches; each run prints
  the prompts per `generate` call it used). `--like-for-like`: ours at TRL's sizes instead (8 prompts per
  `generate` call, shards of 16, 16 samples per reward-model forward). It samples every prompt with
  the starting policy, labels, then trains (off-policy within the iteration, as OAIF batches it).
- TRL: `OnlineDPOTrainer` (trl.experimental.online_dpo) in a subprocess that builds the trainer, calls
  `train()` and `save_model()`. It samples each batch of 8 prompts from the current policy just before
  training on it (on-policy per step). Same samples, tokens and DPO updates; different schedule.

Timed: wall time from process start to process end (interpreter start, imports, Prefect start for ours, model
loads, generation, reward, training, checkpoint), and the run's CPU seconds (user + system of its process tree,
our ephemeral server included: on a shared machine the steadier figure). Printed: labelled pairs trained per
second of wall time,
the ratio ours/TRL, and our time per stage, read from Prefect's database (task runs' start/end): prompts
(load_eval_prompts + load_prompts), generate, annotate, reweight (units + weights), train; "other tasks"
(preflight, report); "Prefect overhead" = wall - sum of task run times (interpreter start, imports, the
ephemeral server, flow and task run bookkeeping, the run lease). The systems alternate (ours, TRL, ours, TRL)
so that drift in a shared machine's load hits both alike; min/median/max over --repeats, and the ratio's own
spread: each repeat's ours/TRL from the two runs side by side. `--baseline CHECKOUT` adds a third system, the
flow of another copy of the repository (a change's "before"), to the same rotation.

Fixed cost of a run: a 1-prompt run of each (--fixed-prompts), and for ours the time from process start to
the first task's start. Per-prompt cost: the slope of the median wall time between the two sizes of --prompts.

One untimed warm-up flow run first creates the Prefect database (PREFECT_HOME in a temp folder, shared by
this invocation's runs, as a user's is across runs); its wall time is printed as the cold start.

    python benchmarks/online_iteration.py [--prompts 64 1024] [--repeats 3] [--fixed-prompts 1]
    python benchmarks/online_iteration.py --start-with trl --json b.json   # another sitting, TRL first
    python benchmarks/online_iteration.py --merge a.json b.json         # the runs of several sittings together
    python benchmarks/online_iteration.py --prompts 1024 --like-for-like  # ours at TRL's batch sizes
    python benchmarks/online_iteration.py --prompts 256 --noise  # with a busy neighbour process (see --noise)
    python benchmarks/online_iteration.py --profile 1024   # cProfile of one flow run: the top costs
    python benchmarks/online_iteration.py --prompts 1 --fixed-prompts 0 --baseline /tmp/base  # before/after
    python benchmarks/online_iteration.py --prompts 64 --baseline-set training.reference_from_sampler=false
"""

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MAX_NEW_TOKENS, N_SAMPLES, TEMPERATURE = 24, 2, 1.0
BATCH_SIZE, BETA, LEARNING_RATE = 8, 0.1, 5e-6
# --like-for-like: TRL samples the 8 prompts of a training batch per generate call and scores their 16 samples
# in one forward; ours then the same (in shards of 16 prompts, the shipped size before it was 64).
LIKE_FOR_LIKE = {"generation": {"batch_size": 8, "shard_size": 16}, "annotation": {"batch_size": 16}}
# --noise: a CPU-bound neighbour for the whole sitting, one process at default priority, not pinned to a core
# (what another user's job does to a shared machine).
NOISE_COMMAND = [sys.executable, "-c", "while True: pass"]
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256

# Stage of each task run name prefix (tasks/: `{stage}-iter-{k}`; the others by function name).
STAGES = {"load-eval-prompts": "prompts", "load-prompts": "prompts", "generate": "generate",
          "annotate": "annotate", "reweight": "reweight", "train": "train"}
# The goals per size: (ours/TRL at least, orchestration + storage share without imports below, in %).
GOALS = {64: (1.0, None), 1024: (1.3, 5)}
STAGE_ORDER = ("prompts", "generate", "annotate", "reweight", "train", "other tasks")


def base_env(workdir: Path, repo: Path = REPO) -> dict:
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(repo) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    return env


def write_prompts(path: Path, count: int) -> None:
    """`count` distinct chat questions (the tiny model's corpus questions, numbered), one JSON line each."""
    from alignment_core.tiny import QUESTIONS

    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}) + "\n")


def flow_config(prompts_file: Path, prompts: int, store_root: Path, cache_dir: Path,
                like_for_like: bool = False, overrides: dict | None = None) -> dict:
    config = {
        "setup": "online_pairwise",
        "iterations": 1,
        "data": {"source": str(prompts_file), "format": "prompt_only", "eval_prompts": 0},
        "model": {"policy": "tiny://llama", "dtype": "float32"},
        "generation": {"backend": "transformers", "prompts_per_iteration": prompts, "n_samples": N_SAMPLES,
                       "temperature": TEMPERATURE, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "seed": 0},
        "annotation": {"annotator": "reward_model", "reward_model": "tiny://reward", "pair_selection": "best_vs_worst"},
        "reweight": {"strategy": "uniform"},
        "training": {"loss": "dpo", "beta": BETA, "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE,
                     "epochs": 1, "warmup_ratio": 0.0, "scheduler": "linear", "max_grad_norm": 1.0,
                     "weight_decay": 0.0, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
        "evaluation": {"enabled": False},
        "store": {"root": str(store_root), "run_name": "bench", "cache_dir": str(cache_dir)},
    }
    if like_for_like:
        for section, values in LIKE_FOR_LIKE.items():
            config[section].update(values)
    for section, values in (overrides or {}).items():
        config[section].update(values)
    return config


def parse_overrides(settings: list[str]) -> dict:
    """`section.field=value` (value as YAML) -> {section: {field: value}}."""
    import yaml

    overrides: dict[str, dict] = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        section, _, field = key.partition(".")
        if not field or not _:
            raise SystemExit(f"--baseline-set {setting!r}: expected section.field=value")
        overrides.setdefault(section, {})[field] = yaml.safe_load(value)
    return overrides


TRL_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    policy_dir, reward_dir, prompts_file, out_dir, count, report = sys.argv[1:7]
    c = json.loads(os.environ["BENCH_CONSTANTS"])
    rows = load_dataset("json", data_files=prompts_file, split="train").select(range(int(count)))
    dataset = rows.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    args = OnlineDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=c["batch_size"], learning_rate=c["learning_rate"],
        beta=[c["beta"]], loss_type="sigmoid", num_train_epochs=1, max_new_tokens=c["max_new_tokens"],
        max_length=c["max_length"], temperature=c["temperature"], top_p=1.0, top_k=0,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True,
        bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
        gradient_checkpointing=False,  # TRL's default is True, which also turns the KV cache off in generate
    )
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), reward_funcs=reward_model,
        args=args, train_dataset=dataset, processing_class=tokenizer, reward_processing_classes=reward_tokenizer)
    started = time.time()
    trainer.train()
    trained = time.time()
    trainer.save_model(os.path.join(out_dir, "final"))
    pairs = trainer.state.global_step * c["batch_size"]
    json.dump({"pairs": min(pairs, int(count)), "train_s": trained - started, "steps": trainer.state.global_step},
              open(report, "w"))
''')


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and their waited-for descendants (our
    flow's ephemeral server included): a run's CPU cost, much less sensitive than its wall time to the other
    work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_trl(workdir: Path, index: int, prompts: int, prompts_file: Path, policy_dir: str, reward_dir: str) -> dict:
    out_dir, report = workdir / f"trl-{index}", workdir / f"trl-{index}.json"
    env = base_env(workdir)
    env["BENCH_CONSTANTS"] = json.dumps({
        "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "beta": BETA, "max_new_tokens": MAX_NEW_TOKENS,
        "max_length": MAX_LENGTH, "temperature": TEMPERATURE})
    env["HF_DATASETS_CACHE"] = str(workdir / "hf-datasets")
    command = [sys.executable, "-c", TRL_SCRIPT, policy_dir, reward_dir, str(prompts_file), str(out_dir),
               str(prompts), str(report)]
    started, cpu = time.time(), children_cpu()
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    wall, cpu = time.time() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"TRL run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(report.read_text())
    return {"wall": wall, "cpu": cpu, "pairs": result["pairs"], "train_s": result["train_s"]}


def _seconds(value) -> float:
    """A Prefect database timestamp (naive ISO text in UTC) as epoch seconds."""
    text = str(value).replace("T", " ").split("+")[0]
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
    from datetime import timezone

    return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()


def task_runs(prefect_home: Path, since: float) -> tuple[list[dict], dict | None]:
    """The task runs (name, start, end in epoch seconds) of the flow run started after `since`, and that flow run."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        db.row_factory = sqlite3.Row
        flows = [dict(r) for r in db.execute("SELECT id, name, start_time, end_time FROM flow_run "
                                             "WHERE start_time IS NOT NULL ORDER BY start_time")]
        flows = [f for f in flows if _seconds(f["start_time"]) >= since - 1]
        if not flows:
            return [], None
        flow = flows[-1]
        rows = [dict(r) for r in db.execute("SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ?",
                                            (flow["id"],))]
    runs = [{"name": r["name"], "start": _seconds(r["start_time"]), "end": _seconds(r["end_time"])}
            for r in rows if r["start_time"] and r["end_time"]]
    return sorted(runs, key=lambda r: r["start"]), flow


def run_ours(workdir: Path, index: int, prompts: int, prompts_file: Path, cache_dir: Path,
             profile: Path | None = None, repo: Path = REPO, like_for_like: bool = False,
             overrides: dict | None = None) -> dict:
    import yaml

    store_root = workdir / f"store-{index}"
    config_path = workdir / f"ours-{index}.yaml"
    config_path.write_text(yaml.safe_dump(flow_config(prompts_file, prompts, store_root, cache_dir, like_for_like,
                                                      overrides)))
    command = [sys.executable]
    if profile:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "flows.iterative_dpo", "--config", str(config_path), "--iterations", "1"]
    started, cpu = time.time(), children_cpu()
    done = subprocess.run(command, env=base_env(workdir, repo), cwd=repo, capture_output=True, text=True)
    wall, cpu = time.time() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"flow run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    from alignment_core.store import ArtifactStore

    store = ArtifactStore(str(store_root))
    units = store.read_manifest(store.stage_uri("bench", 1, "units"))
    generated = store.read_manifest(store.stage_uri("bench", 1, "generations"))["extra"]
    trained = store.read_manifest(store.stage_uri("bench", 1, "metrics"))["extra"]
    runs, flow = task_runs(workdir / "prefect-home", started)
    stages = dict.fromkeys(STAGE_ORDER, 0.0)
    for run in runs:
        name = run["name"].split("-iter-")[0]  # `{stage}-iter-{k}`; preflight gets a random suffix
        stages[STAGES.get(name, "other tasks")] += run["end"] - run["start"]
    first_task = runs[0]["start"] - started if runs else float("nan")
    after_last = started + wall - runs[-1]["end"] if runs else float("nan")
    return {"wall": wall, "cpu": cpu, "pairs": units["rows"], "stages": stages, "first_task": first_task,
            "prompts_per_call": generated.get("prompts_per_call"), "torch_threads": generated.get("torch_threads"),
            "after_last": after_last, "task_names": [r["name"] for r in runs],
            "reference_s": trained["seconds"].get("reference", float("nan")),
            "reference_rows_forward": trained.get("reference_rows_forward"),
            "flow_start": _seconds(flow["start_time"]) - started if flow else float("nan")}


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return (f"{fmt.format(statistics.median(values))} "
            f"[{fmt.format(min(values))}-{fmt.format(max(values))}]")


def every(runs: list[dict]) -> str:
    """Each repeat's wall time, in the order run."""
    return ", ".join(f"{r['wall']:.1f}" for r in runs)


def cpu_spread(runs: list[dict]) -> str:
    values = [r["cpu"] for r in runs if "cpu" in r]  # (--merge of files from before it was recorded)
    return spread(values) if values else "?"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def import_seconds(repeats: int = 3) -> float:
    """Median wall time of a process that only imports torch and transformers' Llama: a cost inside our "Prefect
    overhead" that is not orchestration, and that TRL's process pays too."""
    code = "import torch, transformers, transformers.models.llama.modeling_llama"
    walls = []
    for _ in range(repeats):
        started = time.time()
        subprocess.run([sys.executable, "-c", code], check=True)
        walls.append(time.time() - started)
    return statistics.median(walls)


def summarize(results: dict[tuple[str, int], list[dict]], prompts: list[int], fixed_prompts: int,
              imports: float | None = None) -> None:
    """Throughput, ratio, our stages and overheads per size (median [min-max]); fixed and per-prompt costs."""
    repeats = sorted({len(runs) for runs in results.values()})
    loads = [r["load"] for runs in results.values() for r in runs if "load" in r]
    noise = {r.get("noise") for runs in results.values() for r in runs} - {None}
    print(f"\nruns per system and size: {'/'.join(map(str, repeats))}, median [min-max]; {load_line()}"
          + (f"; 1-min load at the runs' ends {spread(loads, '{:.2f}')}" if loads else "")
          + ("; with a busy neighbour (--noise)" if noise == {True} else "; mixed --noise sittings" if len(noise) > 1
             else ""))
    print(f"max_new_tokens {MAX_NEW_TOKENS}, {N_SAMPLES} samples/prompt, temperature {TEMPERATURE}, "
          f"batch {BATCH_SIZE}, lr {LEARNING_RATE}, beta {BETA}, 1 epoch, fp32")
    sizes = sorted({size for _, size in results})
    flows = [system for system in ("ours", "base") if any(key[0] == system for key in results)]
    for size in sizes:
        trl = results.get(("trl", size))  # none in a --merge of an interrupted sitting
        trl_rate = [r["pairs"] / r["wall"] for r in trl] if trl else []
        print(f"\n{size} prompts: " + (f"TRL {spread([r['wall'] for r in trl])} s wall, {spread(trl_rate, '{:.2f}')} "
                                      f"pairs/s ({trl[0]['pairs']} pairs), {cpu_spread(trl)} CPU s; "
                                      f"repeats {every(trl)} s"
                                      if trl else "no TRL run at this size"))
        for system in flows:
            runs = results.get((system, size))
            if not runs:
                continue
            rate = [r["pairs"] / r["wall"] for r in runs]
            ratio = statistics.median(rate) / statistics.median(trl_rate) if trl else float("nan")
            # Each repeat's own ratio (its run against the TRL run beside it): the spread of the ratio itself.
            paired = [a / b for a, b in zip(rate, trl_rate, strict=False)]
            label = "ours" if system == "ours" else "base (--baseline checkout / --baseline-set)"
            print(f"  {label}: {spread([r['wall'] for r in runs])} s wall, {spread(rate, '{:.2f}')} pairs/s "
                  f"({runs[0]['pairs']} pairs), {cpu_spread(runs)} CPU s; ratio to TRL {ratio:.2f}x"
                  + (f" (per repeat {spread(paired, '{:.2f}')}: {', '.join(f'{p:.2f}' for p in paired)})"
                     if paired else "") + f"; repeats {every(runs)} s")
            wall = statistics.median([r["wall"] for r in runs])
            print(f"  {system} per stage, s (share of the median wall):")
            for stage in STAGE_ORDER:
                values = [r["stages"][stage] for r in runs]
                print(f"    {stage:16s} {spread(values)}  ({100 * statistics.median(values) / wall:.0f}%)")
            overhead = [r["wall"] - sum(r["stages"].values()) for r in runs]
            print(f"    {'Prefect overhead':16s} {spread(overhead)}  ({100 * statistics.median(overhead) / wall:.0f}%: "
                  "wall - sum of task runs)")
            print(f"    {'  first task at':16s} {spread([r['first_task'] for r in runs])}  (process start to the "
                  "first task run's start)")
            print(f"    {'  after last':16s} {spread([r['after_last'] for r in runs])}  (the last task run's end to "
                  "process end)")
            # Orchestration + storage outside the compute stages: Prefect overhead, prompt loading, units and
            # weights (reweight), preflight and report. Writes inside generate/annotate/train are not counted here
            # (the profile puts them well under 1%). Imports are left out of the goal: TRL's process pays them too.
            bookkeeping = [o + r["stages"]["prompts"] + r["stages"]["reweight"] + r["stages"]["other tasks"]
                           for o, r in zip(overhead, runs, strict=True)]
            share = [100 * b / r["wall"] for b, r in zip(bookkeeping, runs, strict=True)]
            without_imports = [100 * (b - (imports or 0.0)) / r["wall"] for b, r in zip(bookkeeping, runs, strict=True)]
            print(f"    orchestration + storage {spread(share)}% of the wall (Prefect overhead + prompts + reweight + "
                  "other tasks)" + ("" if imports is None else f", without the {imports:.1f} s of importing torch and "
                                    f"transformers (measured apart): {spread(without_imports)}%"))
            if system == "ours" and size in GOALS:
                speed, overhead_goal = GOALS[size]
                overhead_share = statistics.median(without_imports)
                met = ratio >= speed and (overhead_goal is None or overhead_share < overhead_goal)
                print(f"  goal at {size} prompts: ours >= {speed}x TRL ({ratio:.2f}x)"
                      + ("" if overhead_goal is None else
                         f" and orchestration + storage without imports < {overhead_goal}% ({overhead_share:.1f}%)")
                      + f": {'MET' if met else 'NOT MET'}")

    if len(prompts) >= 2:
        low, high = min(prompts), max(prompts)
        print()
        for system in (*flows, "trl"):
            if (system, low) not in results or (system, high) not in results:
                continue
            w_low = statistics.median(r["wall"] for r in results[(system, low)])
            w_high = statistics.median(r["wall"] for r in results[(system, high)])
            slope = (w_high - w_low) / (high - low)
            line = (f"{system}: per-prompt cost {1000 * slope:.0f} ms (slope {low}->{high} prompts), "
                    f"intercept {w_low - slope * low:.1f} s")
            if fixed_prompts and (system, fixed_prompts) in results:
                walls = [r["wall"] for r in results[(system, fixed_prompts)]]
                line += (f"; {fixed_prompts}-prompt run {spread(walls)} s wall, "
                         f"{cpu_spread(results[(system, fixed_prompts)])} CPU s")
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system and size (alternating)")
    parser.add_argument("--fixed-prompts", type=int, default=1,
                        help="size of the fixed-cost runs (one per system per repeat); 0: none")
    parser.add_argument("--profile", type=int, default=0, metavar="PROMPTS",
                        help="instead: one flow run under cProfile at this size, and its top costs")
    parser.add_argument("--start-with", choices=("ours", "trl"), default="ours",
                        help="which system runs first in each size's first repeat (then they alternate)")
    parser.add_argument("--json", help="also write every run's numbers to this JSON file")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="instead: summarise the runs of earlier --json files together")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--like-for-like", action="store_true",
                        help="ours at TRL's batch sizes (8 prompts per generate call, shards of 16, 16 samples per "
                             "reward-model forward) instead of the shipped defaults")
    parser.add_argument("--noise", action="store_true",
                        help="run a busy neighbour for the whole sitting: one CPU-bound process (`python -c 'while "
                             "True: pass'`, default priority, not pinned), stopped at the end")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run the flow of another copy of this repository (e.g. `git worktree add "
                             "/tmp/base HEAD~1`) as a third system, 'base', in the same rotation: a change's "
                             "before and after measured under the same load")
    parser.add_argument("--baseline-set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="run the baseline with these config settings (e.g. training.reference_from_sampler="
                             "false: the reference pass on); without --baseline, the baseline is this checkout")
    parser.add_argument("--baseline-prompts", type=int, nargs="+", metavar="PROMPTS",
                        help="run the baseline at these sizes only (default: every size)")
    args = parser.parse_args()
    if args.merge:
        merged: dict[tuple[str, int], list[dict]] = {}
        for path in args.merge:
            for run in json.loads(Path(path).read_text())["runs"]:
                merged.setdefault((run["system"], run["prompts"]), []).append(run)
        imports = [json.loads(Path(path).read_text()).get("import_seconds") for path in args.merge]
        imports = [value for value in imports if value is not None]
        summarize(merged, args.prompts, args.fixed_prompts, statistics.median(imports) if imports else None)
        return

    print("ours: " + (f"TRL's batch sizes {json.dumps(LIKE_FOR_LIKE)}" if args.like_for_like else
                      f"shipped defaults (like for like with TRL: --like-for-like, {json.dumps(LIKE_FOR_LIKE)})"))
    noise = subprocess.Popen(NOISE_COMMAND) if args.noise else None
    if noise:
        print(f"noise: busy neighbour process {noise.pid} ({' '.join(NOISE_COMMAND[1:])}) for the whole sitting")
    try:
        sitting(args, noise is not None)
    finally:
        if noise:
            noise.kill()
            noise.wait()


def sitting(args: argparse.Namespace, noise: bool) -> None:
    """The runs of one invocation (after the options are read and the neighbour, if any, is started)."""
    from alignment_core.models import resolve_model_path

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="online-iteration-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = workdir / "models"  # the tiny builds, made once here: both systems load the same folders
    policy_dir = resolve_model_path("tiny://llama", cache_dir=str(cache_dir))
    reward_dir = resolve_model_path("tiny://reward", cache_dir=str(cache_dir))
    sizes = sorted(set(args.prompts + ([args.fixed_prompts] if args.fixed_prompts else [])))
    if args.profile:
        sizes = [args.profile]
    prompt_files = {}
    for size in sizes:
        prompt_files[size] = workdir / f"prompts-{size}.jsonl"
        write_prompts(prompt_files[size], size)

    print(f"machine: {load_line()}; python {sys.version.split()[0]}", flush=True)
    imports = import_seconds()
    print(f"importing torch + transformers' Llama in a fresh process: {imports:.1f} s (median of 3)", flush=True)
    warmup_file = workdir / "prompts-warmup.jsonl"
    write_prompts(warmup_file, 1)
    cold = run_ours(workdir, 0, 1, warmup_file, cache_dir)  # creates the Prefect database
    print(f"warm-up flow run (empty PREFECT_HOME, 1 prompt): {cold['wall']:.1f} s wall, "
          f"first task at {cold['first_task']:.1f} s", flush=True)

    if args.profile:
        import pstats

        prof = workdir / "flow.prof"
        result = run_ours(workdir, 1, args.profile, prompt_files[args.profile], cache_dir, profile=prof)
        print(f"profiled flow run, {args.profile} prompts: {result['wall']:.1f} s wall (under cProfile); "
              f"stages {json.dumps({k: round(v, 1) for k, v in result['stages'].items()})}")
        stats = pstats.Stats(str(prof))
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
        print(f"profile kept: {prof}")
        return

    results: dict[tuple[str, int], list[dict]] = {}
    index = 1
    for size in sizes:
        for repeat in range(args.repeats):
            systems = ["ours", "trl"] if args.start_with == "ours" else ["trl", "ours"]
            if (args.baseline or args.baseline_set) and (not args.baseline_prompts or size in args.baseline_prompts):
                systems.insert(1, "base")
            shift = repeat % len(systems)  # each system takes each place in the order in turn
            for system in systems[shift:] + systems[:shift]:
                if system in ("ours", "base"):
                    base = system == "base"
                    repo = Path(args.baseline).resolve() if base and args.baseline else REPO
                    result = run_ours(workdir, index, size, prompt_files[size], cache_dir, repo=repo,
                                      like_for_like=args.like_for_like,
                                      overrides=parse_overrides(args.baseline_set) if base else None)
                else:
                    result = run_trl(workdir, index, size, prompt_files[size], policy_dir, reward_dir)
                result.update(load=os.getloadavg()[0], noise=noise)
                results.setdefault((system, size), []).append(result)
                stages = ""
                if system in ("ours", "base"):
                    stages = "  " + " ".join(f"{k}={v:.1f}" for k, v in result["stages"].items()) + \
                        f" first-task={result['first_task']:.1f} after-last={result['after_last']:.1f}" \
                        f" prompts/call={result.get('prompts_per_call')} threads={result.get('torch_threads')}" \
                        f" reference-pass={result['reference_s']:.2f}s over {result['reference_rows_forward']} rows"
                print(f"run {index:2d}: {system:4s} {size:5d} prompts {result['wall']:7.1f} s wall, "
                      f"{result['cpu']:6.1f} s CPU, "
                      f"{result['pairs']} pairs, {result['pairs'] / result['wall']:6.2f} pairs/s{stages}  "
                      f"({load_line()})", flush=True)
                index += 1
                if args.json:  # after every run: an interrupted sitting keeps what it measured (--merge it)
                    Path(args.json).write_text(json.dumps(
                        {"import_seconds": imports, "runs": [{"system": system, "prompts": size, **run}
                                  for (system, size), runs in results.items() for run in runs]}, indent=1))

    summarize(results, args.prompts, args.fixed_prompts, imports)
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
