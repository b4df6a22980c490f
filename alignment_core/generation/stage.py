"""The generate stage: prompts stage in, generations stage out, shard by shard and resumable."""

import importlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import torch

from alignment_core import fanout, gpu, records
from alignment_core.config import GenerationConfig
from alignment_core.generation.common import Generator, shard_seed
from alignment_core.generation.transformers_backend import TransformersGenerator
from alignment_core.models import causal_lm_to_run, load_tokenizer, model_digest

logger = logging.getLogger(__name__)


def _vllm_importable() -> bool:
    try:
        importlib.import_module("vllm")
    except ImportError:
        return False
    return True


def choose_backend(requested: str) -> str:
    """"auto" takes vLLM where it is installed and a CUDA GPU is present (on CPU, transformers is faster)."""
    if requested != "auto":
        return requested
    return "vllm" if torch.cuda.is_available() and _vllm_importable() else "transformers"


def make_generator(
    gen_cfg: GenerationConfig,
    policy_path: str,
    policy_uri: str,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> Generator:
    """A generator for the local model folder `policy_path`; rows record `policy_uri` as their lineage.
    `attn_implementation` is the transformers backend's attention kernel (model.attn_implementation; sdpa where
    that is flex attention)."""
    policy_path = str(policy_path)
    backend = choose_backend(gen_cfg.backend)
    tokenizer = load_tokenizer(tokenizer_path or policy_path)
    digest = model_digest(policy_path)
    if backend == "vllm":
        from alignment_core.generation.vllm_backend import VLLMGenerator  # vllm: installed only where it runs

        return VLLMGenerator(policy_path, tokenizer, gen_cfg, policy_uri, digest, tokenizer_path, dtype)

    model = causal_lm_to_run(policy_path, dtype=dtype, attn_implementation=attn_implementation)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return TransformersGenerator(model, tokenizer, gen_cfg, policy_uri, digest)


def run_generation(
    store,
    prompts_uri: str,
    out_uri: str,
    gen_cfg: GenerationConfig,
    policy_path: str,
    policy_uri: str,
    run_name: str,
    iteration: int,
    fingerprint: dict,
    progress_callback: Callable[[int, int], None] | None = None,
    *,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    shard_subset: tuple[int, int] | None = None,
    sampled_from: dict | None = None,
) -> dict | None:
    """Sample `gen_cfg.n_samples` responses per prompt into `out_uri`; returns the stage manifest.

    `sampled_from`: the policy's place in the run ({"policy_iteration": j, "staleness": s}), written on every row
    and in the manifest.

    Prompts are cut into shards of `gen_cfg.shard_size`. Shards already written under the same fingerprint
    are kept, so a killed stage resumes at its first missing shard; each shard's seed derives from
    (run, iteration, shard), so the resumed shard holds the same samples (exactly so with the transformers
    backend; vLLM's batching may change floating-point reductions). The model is loaded only if a shard is
    missing.

    `shard_subset=(i, N)`: this call is worker i of N (alignment_core/fanout.py): it samples only its missing
    shards i, i+N, ..., and writes the manifest (returned) only if every shard is then in; else returns None.
    """
    prompts = store.read_table(prompts_uri).to_pylist()
    if not prompts:
        raise ValueError(f"prompts stage {prompts_uri} has no rows: nothing to generate")
    duplicated = [pid for pid, count in Counter(p["prompt_id"] for p in prompts).items() if count > 1]
    if duplicated:
        raise ValueError(
            f"prompts stage {prompts_uri} repeats prompt_id {duplicated[0]!r} "
            f"({len(duplicated)} repeated ids): generation ids would collide"
        )
    size = gen_cfg.shard_size
    shards = [prompts[start : start + size] for start in range(0, len(prompts), size)]
    writer = store.stage_writer(out_uri, "generations", fingerprint)
    missing = [index for index in range(len(shards)) if index not in writer.done_shards]
    missing = [index for index in missing if fanout.in_subset(index, shard_subset)]  # this worker's
    if progress_callback:
        progress_callback(len(shards) - len(missing), len(shards))

    backend, prompts_per_call, generated_tokens, generated_rows, skipped_prompts, seconds = None, None, 0, 0, 0, 0.0
    peak_gpu_memory = None
    finish_reasons: Counter = Counter()
    if missing:
        logger.info("generating %d of %d shards into %s", len(missing), len(shards), out_uri)
        gpu.reset_peak_memory()
        with make_generator(gen_cfg, policy_path, policy_uri, tokenizer_path, dtype,
                            attn_implementation) as generator:
            backend, prompts_per_call = generator.backend, generator.prompts_per_call
            for index in missing:
                started = time.perf_counter()
                rows = generator.generate(shards[index], shard_seed(run_name, iteration, index, gen_cfg.seed))
                rows = [{**row, **(sampled_from or {})} for row in rows]
                seconds += time.perf_counter() - started
                table = records.from_rows(rows, records.GENERATIONS, f"generations shard {index}")
                writer.write_shard(index, table)
                generated_rows += len(rows)
                generated_tokens += sum(len(row["response_token_ids"]) for row in rows)
                skipped_prompts += len(shards[index]) - len({row["prompt_id"] for row in rows})
                finish_reasons.update(row["finish_reason"] for row in rows)
                if progress_callback:
                    progress_callback(len(writer.done_shards), len(shards))
            peak_gpu_memory = gpu.peak_memory_gib()  # before the engine shuts down
        gpu.release_memory()
    stats = {"backend": backend, "prompts_per_call": prompts_per_call, "torch_threads": torch.get_num_threads(),
             "generated_shards": len(missing), "generated_rows": generated_rows,
             "generated_tokens": generated_tokens, "skipped_prompts": skipped_prompts,
             "finish_reasons": dict(finish_reasons), "seconds": seconds, "peak_gpu_memory_gib": peak_gpu_memory}
    if shard_subset is not None:  # a fan-out worker: whoever finds every shard in writes the manifest
        fanout.write_worker_report(store, out_uri, shard_subset, stats)
        writer = fanout.writer_if_complete(store, out_uri, "generations", fingerprint, len(shards))
        if writer is None:
            return None
        stats = {**_merged(fanout.worker_reports(store, out_uri)), "workers": shard_subset[1]}
    if sum(writer.rows.values()) == 0:
        raise ValueError(
            f"no prompt of {prompts_uri} fits max_model_len {gen_cfg.max_model_len} with max_new_tokens "
            f"{gen_cfg.max_new_tokens}: every prompt was skipped"
        )
    # Stats cover the shards generated by this call (fan-out: by each worker's last attempt); resumed shards
    # were counted by the call that wrote them. tokens_per_s is per worker (per engine), not their sum.
    return writer.finish(
        {
            **stats,
            "resumed_shards": len(shards) - stats["generated_shards"],
            "seconds": round(stats["seconds"], 3),
            "tokens_per_s": round(stats["generated_tokens"] / stats["seconds"], 1) if stats["seconds"] else None,
            **(sampled_from or {}),
        }
    )


def _merged(reports: list[dict]) -> dict:
    """The fan-out workers' statistics as one: counts summed, the backend any of them used."""
    merged = {"backend": next((r["backend"] for r in reports if r.get("backend")), None)}
    for key in ("generated_shards", "generated_rows", "generated_tokens", "skipped_prompts", "seconds"):
        merged[key] = sum(r.get(key, 0) for r in reports)
    peaks = [r["peak_gpu_memory_gib"] for r in reports if r.get("peak_gpu_memory_gib") is not None]
    merged["peak_gpu_memory_gib"] = max(peaks, default=None)  # per worker, like tokens_per_s
    merged["finish_reasons"] = dict(sum((Counter(r.get("finish_reasons", {})) for r in reports), Counter()))
    return merged
