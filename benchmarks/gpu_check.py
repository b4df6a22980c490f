"""GPU acceptance run (`make gpu-check`): the production path on a real GPU, with every number printed.

A random-weight Llama of about 0.4B parameters (hidden 1024, 24 layers, MLP 4096; built here, no hub) runs two
online iterations of the pipeline's stages (prompts → generate → annotate → reweight → train), in bf16 with
vLLM generation (transformers where vLLM is not installed), once with full fine-tuning, once padding-free with
flex attention, once with a LoRA adapter and, where bitsandbytes is installed, once with QLoRA (a 4-bit base).
Training then runs under `accelerate launch` with FSDP on every GPU there is (one included) and, where DeepSpeed
is installed, with ZeRO-3 (deployments/accelerate/). A variant that fails prints its error and the others still run.

It prints, per variant and iteration: generation tokens/s, training tokens/s and pairs/s, MFU against the GPU's
bf16 dense peak (6 * parameters FLOPs per trained token: forward + backward of the policy; the reference
forward is extra work not counted), where the training round's time went (loading, reference pass, optimizer
steps, checkpoint writes), the peak GPU memory of each stage (from its manifest), and, for the same pairs as
the first round and at the same batch size, TRL's DPOTrainer pairs/s in the same process.

    python benchmarks/gpu_check.py               # a CUDA machine (about 4 minutes on one H200)
    python benchmarks/gpu_check.py --smoke       # any machine: tiny sizes on the CPU, checks the script itself
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from alignment_core import pipeline  # noqa: E402
from alignment_core.config import parse_config  # noqa: E402
from alignment_core.tiny import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from train_throughput import BATCH_SIZE as TRL_BATCH_SIZE  # noqa: E402
from train_throughput import run_trl  # noqa: E402

# Dense bf16 peak FLOP/s by device name (datasheet figures, without sparsity).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def build_model(out: Path, hidden: int, layers: int, mlp: int, dtype: torch.dtype) -> tuple[str, int]:
    """A random-weight Llama with the project's BPE tokenizer; returns (folder, parameters without embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    embedding = model.get_input_embeddings().weight.numel()
    return str(out), sum(p.numel() for p in model.parameters()) - embedding


def variant_config(name: str, model_dir: str, root: str, smoke: bool, gpus: int) -> dict:
    """The pipeline config of one variant (full, lora, qlora, flex, zero3, fsdp)."""
    on_gpu = torch.cuda.is_available() and not smoke
    config = {
        "setup": "online_pairwise", "iterations": 2,
        "data": {"source": "bundled:prompts", "eval_prompts": 8},
        "model": {"policy": model_dir, "dtype": "bfloat16" if on_gpu else "float32"},
        "generation": {"backend": "auto" if on_gpu else "transformers", "prompts_per_iteration": 8 if smoke else 192,
                       "n_samples": 2, "max_new_tokens": 12 if smoke else 128, "temperature": 1.0,
                       "shard_size": 8 if smoke else 64, "batch_size": 8 if smoke else 128,
                       "gpu_memory_utilization": 0.5, "max_model_len": 512},
        # Response length: a reward that rarely ties on a random-weight model, so most prompts give a pair.
        "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:response_length"},
        "training": {"loss": "dpo", "batch_size": 4 if smoke else TRL_BATCH_SIZE, "learning_rate": 1e-5,
                     "precompute_reference": True},
        "evaluation": {"enabled": False},
        "store": {"root": root, "run_name": name},
    }
    if name in ("lora", "qlora"):
        config["model"]["adapter"] = {"r": 16, "alpha": 32, "load_in_4bit": name == "qlora"}
        config["training"]["learning_rate"] = 1e-4
    if name == "flex":  # padding-free: every micro-batch one row, attention block-sparse over its sequences
        config["model"]["attn_implementation"] = "flex_attention"
        config["training"]["padding_free"] = True
    if name in ("zero3", "fsdp"):
        accelerate = REPO / "deployments/accelerate" / {"zero3": "deepspeed_zero3.yaml", "fsdp": "fsdp.yaml"}[name]
        config["training"].update(num_processes=max(gpus, 1), accelerate_config=str(accelerate))
    return config


def run_variant(cfg, params: int, peak_flops: float | None) -> list[dict]:
    """Two online iterations, stage by stage; one result row per iteration."""
    store = pipeline.open_store(cfg)
    policy, rows = cfg.model.policy, []
    seconds: dict[str, float] = {}

    def timed(stage, call, *args, **kwargs):
        started = time.perf_counter()
        result = call(*args, **kwargs)
        seconds[stage] = time.perf_counter() - started
        return result

    for k in range(1, cfg.iterations + 1):
        prompts = timed("prompts", pipeline.load_prompts, cfg, k)
        generations = timed("generations", pipeline.generate, cfg, prompts, policy, k)
        annotations = timed("annotations", pipeline.annotate, cfg, generations, k)
        units = timed("units", pipeline.build_units, cfg, k, generations_uri=generations, annotations_uri=annotations)
        weights = timed("weights", pipeline.reweight, cfg, units, policy, k)
        checkpoint = timed("checkpoint", pipeline.train, cfg, units, weights, policy, cfg.model.policy, k)
        generation = store.read_manifest(generations)["extra"]
        metrics = store.read_manifest(store.stage_uri(cfg.store.run_name, k, "metrics"))["extra"]
        pairs = store.read_manifest(units)["rows"]
        train_tokens_per_s = metrics.get("tokens_per_s")
        round_seconds = metrics.get("seconds", {})
        rows.append({
            "iteration": k, "pairs": pairs,
            "generation_tokens_per_s": generation.get("tokens_per_s"),
            "train_tokens_per_s": train_tokens_per_s,
            "train_pairs_per_s": pairs / seconds["checkpoint"],
            # the reference pass and the optimizer steps: what TRL's trainer.train() does (without its precompute)
            "loop_pairs_per_s": (pairs / (round_seconds["reference"] + round_seconds["train"])
                                 if round_seconds.get("train") else None),
            "round_seconds": round_seconds, "padding_free": metrics.get("padding_free"),
            "mfu": 6 * params * train_tokens_per_s / peak_flops if peak_flops and train_tokens_per_s else None,
            "peak_gpu_gib": {"generate": generation.get("peak_gpu_memory_gib"),
                             "annotate": store.read_manifest(annotations)["extra"].get("peak_gpu_memory_gib"),
                             "train": metrics.get("peak_gpu_memory_gib")},
            "checkpoint_mib": sum(f.stat().st_size for f in Path(store.local_checkpoint(checkpoint)).rglob("*")
                                  if f.is_file()) / 2**20,
            "seconds": {stage: round(s, 2) for stage, s in seconds.items()},
        })
        policy = checkpoint
    return rows


def trl_pairs_per_s(cfg, model_dir: str, workdir: str, on_gpu: bool, iteration: int) -> float:
    """TRL's DPOTrainer on the pairs of one round (the same units ours trained on)."""
    store = pipeline.open_store(cfg)
    units = store.read_pandas(store.stage_uri(cfg.store.run_name, iteration, "units"))
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
             zip(units["prompt"], units["generation1_response"], units["generation2_response"], strict=True)]
    return run_trl(model_dir, pairs, workdir, bf16_on_gpu=on_gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of: full lora qlora flex fsdp zero3")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.smoke
    gpus = torch.cuda.device_count() if on_gpu else 0
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    peak = next((flops for name, flops in BF16_PEAK.items() if name in device), None) if on_gpu else None
    if not on_gpu and not args.smoke:
        sys.exit("no CUDA device: run with --smoke to check the script on the CPU")
    installed = {name for name, package in (("qlora", "bitsandbytes"), ("zero3", "deepspeed"))
                 if importlib.util.find_spec(package) is not None}
    variants = args.variants or (["full", "flex", "lora"] + [v for v in ("qlora", "fsdp", "zero3")
                                                             if v == "fsdp" or v in installed]
                                 if on_gpu else ["full", "lora"])
    print(f"device: {device} x{max(gpus, 1)}; bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = (256, 2, 512) if args.smoke else (1024, 24, 4096)
        model_dir, params = build_model(Path(tmp) / "model", *sizes, torch.bfloat16 if on_gpu else torch.float32)
        print(f"model: Llama hidden {sizes[0]}, {sizes[1]} layers, MLP {sizes[2]}: {params / 1e6:.0f}M parameters "
              "(without embeddings)")
        results, failed = {}, {}
        for name in variants:
            try:
                cfg = parse_config(variant_config(name, model_dir, f"{tmp}/store", args.smoke, gpus))
                results[name] = run_variant(cfg, params, peak)
            except Exception as error:  # noqa: BLE001 - one variant's failure is a result; the others still run
                failed[name] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
                print(f"{name:6s} FAILED: {failed[name]}")
                continue
            for row in results[name]:
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
                print(f"{name:6s} iter {row['iteration']}: {row['pairs']} pairs, generation "
                      f"{row['generation_tokens_per_s']} tok/s, training {row['train_tokens_per_s']:.0f} tok/s = "
                      f"{row['train_pairs_per_s']:.2f} pairs/s ({row['loop_pairs_per_s']:.2f} in the reference pass "
                      "and steps), "
                      f"MFU {mfu}, peak GPU GiB {row['peak_gpu_gib']}, checkpoint {row['checkpoint_mib']:.1f} MiB, "
                      f"stage seconds {row['seconds']}, training round seconds {row['round_seconds']}, "
                      f"padding-free {row['padding_free']}")
        # TRL last: its Trainer fixes the process's accelerate state (mixed precision) for every later Accelerator.
        if "full" in results:
            try:
                cfg = parse_config(variant_config("full", model_dir, f"{tmp}/store", args.smoke, gpus))
                # The last round: by then ours runs warm (CUDA context, kernels), as TRL does after it.
                last = results["full"][-1]
                trl = trl_pairs_per_s(cfg, model_dir, tmp, on_gpu, last["iteration"])
                print(f"TRL DPOTrainer on iteration {last['iteration']}'s pairs: {trl:.2f} pairs/s (its "
                      f"trainer.train()). Ours: {last['loop_pairs_per_s']:.2f} pairs/s in the reference pass and "
                      f"optimizer steps (ratio {last['loop_pairs_per_s'] / trl:.2f}x), {last['train_pairs_per_s']:.2f}"
                      f" pairs/s for the whole stage with loading, the reference pass and the checkpoint write "
                      f"(ratio {last['train_pairs_per_s'] / trl:.2f}x)")
            except Exception as error:  # noqa: BLE001 - the peer's failure is reported, not fatal
                failed["trl"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
        print("JSON " + json.dumps({"device": device, "gpus": gpus, "params": params, "results": results,
                                    "failed": failed}))
    if failed:
        sys.exit(f"failed variants: {', '.join(failed)}")


if __name__ == "__main__":
    main()
