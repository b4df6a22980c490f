"""Peak memory of a LoRA DPO round against a full DPO round, same model, same data.

The model is a random-weight Llama built from a config (hidden 1024, 8 layers, intermediate 2816, 16 heads;
~110M parameters with the tiny model's 1k-token BPE; nothing from the hub), saved once. Each variant then
runs in a fresh Python process (`--variant`), so that one's allocations cannot hide in the other's peak:

- full: all weights train (AdamW state for every parameter) and the reference is a second, frozen copy;
- lora: model.adapter at its shipped settings (r=16, alpha 32, dropout 0.05, every linear layer); the reference
  is the same weights with the adapter off;
- qlora (where bitsandbytes is installed; 0.50 quantizes on a CPU): the same with the frozen base in 4-bit NF4.

Each at the shipped training settings, so with gradient checkpointing where it is on by default (LoRA, not full
fine-tuning); `--gradient-checkpointing on|off` sets it in both.

Measured: on CPU the process's RSS high-water mark (`resource.getrusage(...).ru_maxrss`; tracemalloc does
not see torch's allocator), both in total and above the RSS after imports and loading the tokenizer
(`baseline`); on a CUDA device `torch.cuda.max_memory_allocated`. fp32 (`--dtype`), batch 4, `--steps` steps,
reference log-probs precomputed (the default).

Each variant runs twice on CPU: with glibc's allocator as it comes, and with it returning freed memory
(`MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB). glibc raises its mmap threshold to the largest block freed so far
(up to 32 MiB), so the forwards' activation buffers of 1-4 MiB then come from the heap, which keeps them after
they are freed: the RSS peak counts memory no tensor holds. The second figure is the peak of live memory, as
`max_memory_allocated` is on a GPU (where the caching allocator keeps freed blocks likewise).

    python benchmarks/lora_memory.py [--steps 3] [--hidden 1024] [--layers 8] [--gradient-checkpointing on|off]
                                     [--dtype bfloat16]
"""

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH_SIZE = 4
# glibc as it comes, and returning freed memory to the system (its mmap threshold fixed, so no longer raised)
ALLOCATORS = {"default": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}}


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(out: Path, hidden: int, layers: int, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment_core.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # Saved in the dtype it trains in, as hub checkpoints are: loading fp32 files as bf16 would page in the
    # fp32 bytes (counted in RSS) beside the bf16 copy.
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model: hidden {hidden} x {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB in {dtype}")


def run_variant(variant: str, model_dir: str, steps: int, gradient_checkpointing: bool | None = None,
                dtype: str = "float32") -> dict:
    """One DPO round in this process; returns its memory figures."""
    import pandas as pd
    import torch

    from alignment_core.config import parse_config
    from alignment_core.models import load_tokenizer
    from alignment_core.store import ArtifactStore
    from alignment_core.tiny import ADJECTIVES, NOUNS, VERBS
    from alignment_core.training import Trainer

    load_tokenizer(model_dir)
    baseline = rss_now_mib()
    words, rng = NOUNS + VERBS + ADJECTIVES, random.Random(0)
    units = pd.DataFrame([{
        "unit_id": f"u{i}", "prompt_id": f"p{i}", "prompt": " ".join(rng.choices(words, k=24)),
        "prompt_messages": [{"role": "user", "content": " ".join(rng.choices(words, k=24))}],
        "generation1_response": " ".join(rng.choices(words, k=48)),
        "generation2_response": " ".join(rng.choices(words, k=48)),
        "generation1_reward": 1.0, "generation2_reward": 0.0} for i in range(BATCH_SIZE * steps)])
    model = {"policy": model_dir, "dtype": dtype}
    if variant != "full":
        model["adapter"] = {"load_in_4bit": variant == "qlora"}  # otherwise the shipped settings
    cfg = parse_config({"setup": "offline_pairwise", "model": model,
                        "training": {"loss": "dpo", "batch_size": BATCH_SIZE, "epochs": 1, "learning_rate": 1e-5,
                                     "warmup_ratio": 0.0, "scheduler": "constant",
                                     "gradient_checkpointing": gradient_checkpointing}})
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        trainer = Trainer(cfg, policy_path=model_dir, tokenizer_path=None, store=store)
        encoded = trainer.batch_factory.encode(units)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = trainer.train(encoded, store.checkpoint_uri("bench", 0), store.stage_uri("bench", 0, "metrics"))
        seconds = time.perf_counter() - started
        checkpoint_mib = sum(p.stat().st_size for p in Path(store.local_checkpoint(result.checkpoint_uri)).rglob("*")
                             if p.is_file()) / 2**20
    peak = rss_peak_mib()
    figures = {"variant": variant, "gradient_checkpointing": trainer.gradient_checkpointing, "steps": result.steps,
               "seconds": round(seconds, 1),
               "rss_peak_mib": round(peak), "rss_baseline_mib": round(baseline),
               "rss_above_baseline_mib": round(peak - baseline), "checkpoint_mib": round(checkpoint_mib, 1),
               "final_loss": round(result.metrics["loss"], 4)}
    if on_gpu:
        figures["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gradient-checkpointing",
                        choices=["on", "off"], help="training.gradient_checkpointing in both variants (activations "
                        "recomputed in backward); default: each variant's shipped setting")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype")
    parser.add_argument("--variant", choices=["full", "lora", "qlora"],
                        help="(internal) run one variant in this process")
    parser.add_argument("--model-dir", help="(internal) the saved model")
    args = parser.parse_args()
    if args.variant:
        chosen = {"on": True, "off": False, None: None}[args.gradient_checkpointing]
        print(json.dumps(run_variant(args.variant, args.model_dir, args.steps, chosen, args.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.hidden, args.layers, args.dtype)
        results = {}
        variants = ("full", "lora", "qlora") if importlib.util.find_spec("bitsandbytes") else ("full", "lora")
        for allocator, env in ALLOCATORS.items():
            for variant in variants:
                done = subprocess.run([sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir),
                                       "--steps", str(args.steps), "--dtype", args.dtype,
                                       *(["--gradient-checkpointing", args.gradient_checkpointing]
                                         if args.gradient_checkpointing else [])],
                                      capture_output=True, text=True, check=False, env={**os.environ, **env})
                if done.returncode != 0:
                    sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
                results[allocator, variant] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps({"allocator": allocator, **results[allocator, variant]}))
    for allocator in ALLOCATORS:
        full = results[allocator, "full"]
        for variant in variants[1:]:
            adapted = results[allocator, variant]
            print(f"peak RSS, {allocator} allocator: {variant} {adapted['rss_peak_mib']} MiB / full "
                  f"{full['rss_peak_mib']} MiB = {adapted['rss_peak_mib'] / full['rss_peak_mib']:.2f}x (goal < 0.5x); "
                  f"above the baseline after imports: {adapted['rss_above_baseline_mib']} / "
                  f"{full['rss_above_baseline_mib']} MiB = "
                  f"{adapted['rss_above_baseline_mib'] / full['rss_above_baseline_mib']:.2f}x")
    full = results["default", "full"]
    for variant in variants[1:]:
        adapted = results["default", variant]
        if "cuda_max_allocated_mib" in full:
            print(f"CUDA max allocated: {variant} {adapted['cuda_max_allocated_mib']} MiB / full "
                  f"{full['cuda_max_allocated_mib']} MiB = "
                  f"{adapted['cuda_max_allocated_mib'] / full['cuda_max_allocated_mib']:.2f}x")
        print(f"checkpoint: {variant} {adapted['checkpoint_mib']} MiB, full {full['checkpoint_mib']} MiB")


if __name__ == "__main__":
    main()
