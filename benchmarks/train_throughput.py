"""DPO training throughput: this project's Trainer against TRL's DPOTrainer, in one process, alternating.

Same model (the tiny Llama: hidden 256, 4 layers), same data (256 random-word pairs, prompts of 16-48 words,
responses of 32-96 words), batch size 8, beta 0.1, fp32, reference log-probs computed on the fly in both,
one epoch per run. Each system trains `--repeats` times, in alternating order, so that drift in the load of
a shared machine hits all alike. Timed: the `train()` call only (model set-up and tokenisation excluded);
ours includes writing its final checkpoint.

Model FLOPs utilisation: per pair, the policy does forward + backward (3 forwards) and the reference one
forward over both responses' real (unpadded) tokens; a forward costs 2 * N FLOPs per token (N: parameters
without the input embedding) plus causal attention, 2 * layers * hidden * position. The peak is a 2048 x 2048
fp32 matmul on the same threads.

Ours runs three ways per repeat: with its defaults (on a CPU: each pair's prompt computed once,
`training.prefix_sharing`, and the pairs 4 at a time sorted by length, `training.rows_per_forward: 4`), with one
forward per micro-batch (`rows_per_forward: 0`, what TRL does and the GPU default; prefix sharing still on), and
with one padding-free forward per micro-batch (`training.padding_free`: the sequences packed into rows, position
ids restarting at each, no prefix sharing; the default with flash attention). All three give the same log-probs
and gradients (tests/test_training.py).

    python benchmarks/train_throughput.py [--pairs 256] [--repeats 2]
"""

import argparse
import logging
import os
import random
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from alignment_core.config import parse_config  # noqa: E402
from alignment_core.store import ArtifactStore  # noqa: E402
from alignment_core.tiny import ADJECTIVES, NOUNS, VERBS, build_tiny  # noqa: E402
from alignment_core.training import Trainer  # noqa: E402

BATCH_SIZE, BETA, LEARNING_RATE = 8, 0.1, 5e-6
WORDS = NOUNS + VERBS + ADJECTIVES


def random_words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": random_words(rng, 16, 48), "chosen": random_words(rng, 32, 96),
             "rejected": random_words(rng, 32, 96)} for _ in range(n)]


def measure_matmul_peak(size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a fp32 size x size matmul on this process's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started)


def flops_per_pair(model_dir: str, encoded: list[dict]) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 3 * hidden * config.intermediate_size  # attention + MLP weights
    parameters = layers * per_layer + hidden * config.vocab_size  # + LM head (the embedding is a lookup)
    total = 0.0
    for example in encoded:
        for side in ("generation1", "generation2"):
            length = len(example["prompt_ids"]) + len(example[f"{side}_response_ids"])
            forward = 2 * parameters * length + 2 * layers * hidden * length * length  # causal attention
            total += 4 * forward  # policy forward + backward (3x) + reference forward (1x)
    return total / len(encoded)


def run_ours(model_dir: str, pairs: list[dict], workdir: str, index: int, **forwards) -> float:
    """Pairs per second of one epoch of this project's DPO round (`forwards`: padding_free, rows_per_forward)."""
    cfg = parse_config({
        "setup": "offline_pairwise",
        "training": {"loss": "dpo", "beta": BETA, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                     "epochs": 1, "precompute_reference": False, "max_length": 512, "max_prompt_length": 256,
                     "warmup_ratio": 0.0, "scheduler": "linear", **forwards},
    })
    store = ArtifactStore(os.path.join(workdir, "store"))
    trainer = Trainer(cfg, policy_path=model_dir, tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(units_frame(pairs))
    started = time.perf_counter()
    trainer.train(encoded, store.checkpoint_uri("bench", index), store.stage_uri("bench", index, "metrics"),
                  resume=False)
    return len(pairs) / (time.perf_counter() - started)


def units_frame(pairs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{
        "unit_id": f"u{i}", "prompt_id": f"p{i}", "prompt": p["prompt"],
        "prompt_messages": [{"role": "user", "content": p["prompt"]}],
        "generation1_response": p["chosen"], "generation2_response": p["rejected"],
        "generation1_reward": 1.0, "generation2_reward": 0.0,
    } for i, p in enumerate(pairs)])


def run_trl(model_dir: str, pairs: list[dict], workdir: str, bf16_on_gpu: bool = False) -> float:
    """Pairs per second of one epoch of TRL's DPOTrainer on the same chat-formatted pairs (fp32 on the CPU, or
    bf16 on the GPU with `bf16_on_gpu`, as benchmarks/gpu_check.py runs it)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": p["prompt"]}],
        "chosen": [{"role": "assistant", "content": p["chosen"]}],
        "rejected": [{"role": "assistant", "content": p["rejected"]}],
    } for p in pairs])
    args = DPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=BATCH_SIZE, beta=BETA,
        learning_rate=LEARNING_RATE, num_train_epochs=1, max_length=512, precompute_ref_log_probs=False,
        lr_scheduler_type="linear", save_strategy="no", report_to="none", logging_steps=10_000,
        use_cpu=not bf16_on_gpu, bf16=bf16_on_gpu, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        gradient_checkpointing=False,  # TRL's configs default to True; ours does not recompute activations either
    )
    dtype = torch.bfloat16 if bf16_on_gpu else torch.float32
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), args=args,
                         train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir))
    started = time.perf_counter()
    trainer.train()
    return len(pairs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="runs per system (alternating)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as workdir:
        model_dir = str(build_tiny(os.path.join(workdir, "tiny"), num_layers=4))
        pairs = make_pairs(args.pairs)
        peak = measure_matmul_peak()
        probe = Trainer(parse_config({"setup": "offline_pairwise", "training": {"max_length": 512,
                                                                               "max_prompt_length": 256}}),
                        policy_path=model_dir, tokenizer_path=None, store=ArtifactStore(workdir))
        encoded = probe.batch_factory.encode(units_frame(pairs))
        flops = flops_per_pair(model_dir, encoded)
        tokens = sum(len(e["prompt_ids"]) * 2 + len(e["generation1_response_ids"]) + len(e["generation2_response_ids"])
                     for e in encoded) / len(encoded)

        # ours: the defaults (see the module docstring); ours-padded: one forward per micro-batch (prefix-shared
        # pairs); ours-packed: one padding-free forward per micro-batch. Alternated so that drift in a shared machine's
        # load hits all alike.
        systems = {
            "ours": lambda i: run_ours(model_dir, pairs, workdir, i),
            "ours-padded": lambda i: run_ours(model_dir, pairs, workdir, i, padding_free=False, rows_per_forward=0),
            "ours-packed": lambda i: run_ours(model_dir, pairs, workdir, i, padding_free=True),
            "trl": lambda i: run_trl(model_dir, pairs, workdir),
        }
        results: dict[str, list[float]] = {name: [] for name in systems}
        order = [name for repeat in range(args.repeats) for name in (list(systems) if repeat % 2 == 0
                                                                    else list(reversed(systems)))]
        for index, system in enumerate(order):
            rate = systems[system](index)
            results[system].append(rate)
            print(f"run {index + 1}: {system:11s} {rate:6.2f} pairs/s", flush=True)

    print(f"\nthreads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{tokens:.0f} tokens/pair, {flops / 1e9:.2f} GFLOP/pair (policy fwd+bwd + reference fwd)")
    for system, rates in results.items():
        rate = statistics.median(rates)
        print(f"{system:11s}: {rate:6.2f} pairs/s (median of {[round(r, 2) for r in rates]}), "
              f"MFU {100 * rate * flops / peak:.1f}%")
    trl = statistics.median(results["trl"])
    print("ratio to TRL (goal >= 1.3x): " + ", ".join(
        f"{system} {statistics.median(rates) / trl:.2f}x" for system, rates in results.items() if system != "trl"))


if __name__ == "__main__":
    main()
