"""Models kept loaded between stages (scale_out.keep_models_loaded) against each stage loading its own: several
online iterations of the flow, evaluation on, each setting in a fresh process, alternating.

The policy and the reward model are random-weight Llamas built from a config (`--hidden`, `--layers`; default
hidden 1024 x 8 layers, 105M parameters, 400 MiB in fp32, with the tiny model's 1k-token BPE; nothing from the
hub), saved once, so that a load costs what a model of that size costs. Each run: `python -m flows.iterative_dpo
--iterations N` (ephemeral Prefect, transformers backend, the reward model labels and judges the held-out
samples, sampler log-probs as the reference). Without kept models an iteration loads the policy to sample, again
to train, the new checkpoint to evaluate (and the initial policy's held-out samples once), and the reward model
to label and again to judge; with them, the reward model once a run, and each checkpoint once.

Printed: wall time of each run, the median and spread per setting, the ratio, and the time per stage (task runs
from Prefect's database, as benchmarks/online_iteration.py reads them).

    python benchmarks/kept_models.py [--iterations 3] [--repeats 2] [--prompts 32] [--hidden 1024] [--layers 8]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_iteration import REPO, base_env, children_cpu, load_line, spread, task_runs, write_prompts  # noqa: E402

SETTINGS = {"kept": True, "loaded": False}  # scale_out.keep_models_loaded


def build_models(out: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from alignment_core.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    folders = (out / "policy", out / "reward")
    for folder, model_class in zip(folders, (LlamaForCausalLM, LlamaForSequenceClassification), strict=True):
        torch.manual_seed(0)
        model = model_class(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"models: hidden {hidden} x {layers} layers, {parameters / 1e6:.1f}M parameters, "
          f"{parameters * 4 / 2**20:.0f} MiB in fp32 each")
    return folders


def run_flow(workdir: Path, index: int, keep: bool, args, prompts_file: Path, policy: Path, reward: Path) -> dict:
    store_root = workdir / f"store-{index}"
    config = {
        "setup": "online_pairwise", "iterations": args.iterations,
        "data": {"source": str(prompts_file), "format": "prompt_only", "eval_prompts": args.eval_prompts},
        "model": {"policy": str(policy)},
        "generation": {"backend": "transformers", "prompts_per_iteration": args.prompts, "max_new_tokens": 16},
        "annotation": {"annotator": "reward_model", "reward_model": str(reward)},
        "training": {"batch_size": 8, "learning_rate": 5e-6},
        "evaluation": {"max_new_tokens": 16},
        "scale_out": {"keep_models_loaded": keep},
        "store": {"root": str(store_root), "run_name": "bench", "cache_dir": str(workdir / "cache")},
    }
    config_path = workdir / f"run-{index}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    started, cpu = time.time(), children_cpu()
    done = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(config_path)],
                          env=base_env(workdir), cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.time() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"flow run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    runs, _ = task_runs(workdir / "prefect-home", started)
    stages: dict[str, float] = {}
    for run in runs:
        stage = run["name"].split("-iter-")[0]
        stages[stage] = stages.get(stage, 0.0) + run["end"] - run["start"]
    return {"wall": wall, "cpu": cpu, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kept-models-") as tmp:
        workdir = Path(tmp)
        policy, reward = build_models(workdir / "models", args.hidden, args.layers)
        prompts_file = workdir / "prompts.jsonl"
        write_prompts(prompts_file, args.prompts * args.iterations + args.eval_prompts)
        print(f"machine: {load_line()}; {args.iterations} iterations of {args.prompts} prompts, "
              f"{args.eval_prompts} held-out prompts", flush=True)
        run_flow(workdir, 0, True, argparse.Namespace(**{**vars(args), "iterations": 1}), prompts_file, policy,
                 reward)  # untimed: creates the Prefect database
        results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        index = 1
        for repeat in range(args.repeats):
            order = list(SETTINGS) if repeat % 2 == 0 else list(SETTINGS)[::-1]
            for name in order:
                result = run_flow(workdir, index, SETTINGS[name], args, prompts_file, policy, reward)
                results[name].append(result)
                stages = " ".join(f"{k}={v:.1f}" for k, v in sorted(result["stages"].items()) if v >= 0.05)
                print(f"run {index}: {name:6s} {result['wall']:6.1f} s wall, {result['cpu']:6.1f} s CPU  {stages}  "
                      f"({load_line()})", flush=True)
                index += 1
    walls = {name: [r["wall"] for r in runs] for name, runs in results.items()}
    for name, runs in results.items():
        stage_names = sorted({stage for r in runs for stage in r["stages"]})
        medians = {stage: statistics.median(r["stages"].get(stage, 0.0) for r in runs) for stage in stage_names}
        print(f"{name} (keep_models_loaded {str(SETTINGS[name]).lower()}): {spread(walls[name])} s wall; per stage "
              + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in medians.items() if seconds >= 0.05))
    kept, loaded = statistics.median(walls["kept"]), statistics.median(walls["loaded"])
    print(f"models kept loaded: {kept:.1f} s against {loaded:.1f} s loading them in every stage (medians of "
          f"{args.repeats}, {args.iterations} iterations): {loaded / kept:.2f}x as fast")


if __name__ == "__main__":
    main()
