"""What both generation backends share: the Generator protocol, seeds, ids, lineage and row building.

A backend only has to turn (prompt token ids, seed) into sampled token ids, their raw log-probs and a finish
reason; everything that makes the rows comparable across backends (prompt rendering, ids, the JSON of the
sampling parameters, decoding of the response text) lives here, so the two backends cannot drift apart.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from alignment_core.config import GenerationConfig
from alignment_core.rendering import end_of_turn_id, render_prompt_ids

logger = logging.getLogger(__name__)

class Generator(Protocol):
    """Samples responses for prompt rows (records.PROMPTS) and returns rows of records.GENERATIONS."""

    backend: str
    prompts_per_call: int | None  # None: the whole shard

    def generate(self, prompts: list[dict], seed: int) -> list[dict]: ...

    def close(self) -> None: ...


def shard_seed(run_name: str, iteration: int, shard_index: int, base_seed: int) -> int:
    """The sampling seed of one shard: a stable hash of where the shard sits, so a resumed shard is the same.

    Python's `hash()` is salted per process, hence sha256; the result fits a signed 32-bit int because some
    samplers (vLLM's per-request seeds, numpy) accept no more.
    """
    key = json.dumps([run_name, iteration, shard_index, base_seed])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 2**31


def request_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed inside a shard, so two prompts of one shard do not share a random stream."""
    return int(hashlib.sha256(f"{seed}|{prompt_id}".encode()).hexdigest()[:8], 16) % 2**31


def generation_id(prompt_id: str, policy_digest: str, seed: int, sample_index: int) -> str:
    return hashlib.sha256(f"{prompt_id}|{policy_digest}|{seed}|{sample_index}".encode()).hexdigest()[:16]


def sampling_params_json(gen_cfg: GenerationConfig) -> str:
    """The sampling parameters every row records; the same JSON for both backends."""
    return json.dumps(
        {
            "n": gen_cfg.n_samples,
            "temperature": gen_cfg.temperature,
            "top_p": gen_cfg.top_p,
            "max_new_tokens": gen_cfg.max_new_tokens,
        },
        sort_keys=True,
    )


def stop_token_ids(tokenizer, generation_config_eos: int | list[int] | None) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS, the chat template's end-of-turn token (what training
    appends to a response: `rendering.end_of_turn_id`) and the model's generation_config EOS ids.

    vLLM stops on the same union (chat models such as Llama 3 list extra end-of-turn ids only in
    generation_config.json), so both backends end responses at the same token.
    """
    ids = [] if generation_config_eos is None else (
        [generation_config_eos] if isinstance(generation_config_eos, int) else list(generation_config_eos)
    )
    if tokenizer.eos_token_id is not None:
        ids[:0] = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config define no EOS token to stop at")
    return ids


def render_prompts(
    tokenizer, prompts: list[dict], gen_cfg: GenerationConfig
) -> tuple[list[dict], list[list[int]]]:
    """Prompt token ids exactly as training sees them; prompts that leave no room to answer are skipped.

    A prompt whose tokens plus `max_new_tokens` exceed `max_model_len` cannot be answered in full (vLLM
    rejects it); it is skipped with a warning naming it, and the stage counts the skips in its manifest.
    """
    kept, kept_ids = [], []
    for prompt in prompts:
        ids = render_prompt_ids(tokenizer, prompt["prompt_messages"])
        if len(ids) + gen_cfg.max_new_tokens > gen_cfg.max_model_len:
            logger.warning(
                "skipping prompt %s: %d prompt tokens + max_new_tokens %d > max_model_len %d",
                prompt["prompt_id"], len(ids), gen_cfg.max_new_tokens, gen_cfg.max_model_len,
            )
            continue
        kept.append(prompt)
        kept_ids.append(list(ids))
    return kept, kept_ids


@dataclass(frozen=True)
class Lineage:
    """Where a sample came from; the same for every row a generator writes."""

    policy_uri: str
    policy_digest: str
    sampling_params: str  # JSON, see sampling_params_json
    backend: str


def generation_row(
    prompt: dict,
    sample_index: int,
    token_ids: list[int],
    token_logprobs: list[float],
    finish_reason: str,
    seed: int,
    tokenizer,
    lineage: Lineage,
) -> dict:
    """One records.GENERATIONS row; the response text is the token ids decoded without special tokens."""
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(f"prompt {prompt['prompt_id']}: unexpected finish reason {finish_reason!r}")
    if len(token_logprobs) != len(token_ids):
        raise RuntimeError(
            f"prompt {prompt['prompt_id']}: {len(token_logprobs)} log-probs for {len(token_ids)} tokens"
        )
    # Rounded to the float32 the table stores, so sum_logprob is exactly the sum of what is read back.
    token_logprobs = np.asarray(token_logprobs, dtype=np.float32).tolist()
    return {
        "generation_id": generation_id(prompt["prompt_id"], lineage.policy_digest, seed, sample_index),
        "prompt_id": prompt["prompt_id"],
        "prompt": prompt["prompt"],
        "prompt_messages": prompt["prompt_messages"],
        "sample_index": sample_index,
        "response": tokenizer.decode(token_ids, skip_special_tokens=True),
        "response_token_ids": token_ids,
        "token_logprobs": token_logprobs,
        "sum_logprob": float(sum(token_logprobs)),
        "finish_reason": finish_reason,
        "policy_uri": lineage.policy_uri,
        "policy_digest": lineage.policy_digest,
        "sampling_params": lineage.sampling_params,
        "seed": seed,
        "backend": lineage.backend,
    }
