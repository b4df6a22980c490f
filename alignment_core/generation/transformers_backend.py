"""The transformers backend: batched `model.generate` with left padding; the fallback where vLLM is absent.

Log-probs come from `output_logits` (the model's raw logits at each step, before temperature and top-p),
log-softmaxed in float32: the same quantity vLLM returns in its default `raw_logprobs` mode.

Memory: `output_logits` keeps one [batch_size * n_samples, vocab] tensor per generated step until generate
returns, i.e. batch_size * n_samples * max_new_tokens * vocab * 4 bytes (fp32). With a 128k vocabulary that is
~32 GiB for 16 prompts x 4 samples x 128 tokens. Unset, `generation.batch_size` is chosen within a bound on
those bytes (`auto_prompts_per_call`).
"""

import torch
from transformers import GenerationConfig as HFGenerationConfig

from alignment_core.config import GenerationConfig
from alignment_core.generation.common import (
    Lineage,
    generation_row,
    render_prompts,
    sampling_params_json,
    stop_token_ids,
)

# generation.batch_size unset: sequences (prompts x n_samples) per model.generate call, by device. Measured on
# 2 CPU cores (tiny Llama, 1024 prompts x 2 samples x 24 tokens, issue 21): the stage's CPU seconds were 28-29
# at 8 prompts per call, 19-20 at 16, 14-15 at 64 and 14 at 128. Past ~128 sequences a CPU gains nothing (and
# wall time rose: 29 against 23 s); a GPU keeps gaining from wider batches.
AUTO_SEQUENCES_PER_CALL = {"cpu": 128, "cuda": 512}
# ...and within this many bytes of kept float32 logits (see Memory above).
AUTO_LOGITS_BYTES = 2**30


def auto_prompts_per_call(gen_cfg: GenerationConfig, vocab_size: int, device_type: str) -> int:
    """Prompts per `generate` call when `generation.batch_size` is unset: as many as the device's sequence
    budget and the logits budget allow (at least 1). A shard smaller than that is one call."""
    n = gen_cfg.n_samples
    by_sequences = AUTO_SEQUENCES_PER_CALL.get(device_type, AUTO_SEQUENCES_PER_CALL["cpu"]) // n
    by_logits = AUTO_LOGITS_BYTES // (n * gen_cfg.max_new_tokens * vocab_size * 4)
    return max(1, min(by_sequences, by_logits))


class TransformersGenerator:
    """Samples with `model.generate`; deterministic for a given (prompts, seed, prompts per call) on one device.
    `prompts_per_call` is `generation.batch_size`, or `auto_prompts_per_call` where that is unset.

    The seed is applied inside `torch.random.fork_rng`, so the caller's global RNG is left as it was. Two
    threads generating at once in one process share torch's global RNG and are then not reproducible:
    run one generation at a time per process (the pipeline does).
    """

    backend = "transformers"

    def __init__(self, model, tokenizer, gen_cfg: GenerationConfig, policy_uri: str, policy_digest: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.gen_cfg = gen_cfg
        self.lineage = Lineage(policy_uri, policy_digest, sampling_params_json(gen_cfg), self.backend)
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.prompts_per_call = gen_cfg.batch_size or auto_prompts_per_call(
            gen_cfg, model.get_output_embeddings().weight.shape[0], model.device.type)
        # Sampling is described by our config alone: a checkpoint's generation_config.json defaults
        # (repetition_penalty, top_k, min_new_tokens, ...) would otherwise fill every knob we leave unset.
        self.model.generation_config = HFGenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )

    def __enter__(self) -> "TransformersGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to shut down; the model is freed when the generator is."""

    def _hf_generation_config(self) -> HFGenerationConfig:
        cfg = self.gen_cfg
        if cfg.temperature > 0:
            sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
        else:
            sampling = {"do_sample": False}
        return HFGenerationConfig(
            **sampling,
            top_k=0,  # transformers' default top_k=50 would truncate the distribution; vLLM applies none
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,
        )

    def generate(self, prompts: list[dict], seed: int) -> list[dict]:
        kept, prompt_ids = render_prompts(self.tokenizer, prompts, self.gen_cfg)
        device = self.model.device
        rng_devices = [device] if device.type == "cuda" else []
        rows: list[dict] = []
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(kept), self.prompts_per_call):
                end = start + self.prompts_per_call
                rows += self._generate_batch(kept[start:end], prompt_ids[start:end], seed)
        return rows

    def _generate_batch(self, prompts: list[dict], prompt_ids: list[list[int]], seed: int) -> list[dict]:
        n = self.gen_cfg.n_samples
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        # Each prompt repeated n times, rows [p0 s0, p0 s1, ..., p1 s0, ...]; this also works for greedy
        # decoding, where transformers refuses num_return_sequences > 1.
        device = self.model.device
        output = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0).to(device),
            attention_mask=attention_mask.repeat_interleave(n, dim=0).to(device),
            generation_config=self._hf_generation_config(),
        )
        new_tokens = output.sequences[:, width:]
        token_logprobs = torch.stack(
            [
                step_logits.float().log_softmax(-1).gather(-1, new_tokens[:, step : step + 1]).squeeze(-1)
                for step, step_logits in enumerate(output.logits)
            ],
            dim=1,
        ).cpu()
        new_tokens = new_tokens.cpu()
        stop_ids = set(self.stop_ids)

        rows = []
        for sequence in range(new_tokens.shape[0]):
            tokens = new_tokens[sequence].tolist()
            # Finished sequences are padded until the whole batch stops: cut after the first stop token.
            stop_at = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
            finish_reason = "length" if stop_at is None else "stop"
            length = len(tokens) if stop_at is None else stop_at + 1
            rows.append(
                generation_row(
                    prompts[sequence // n],
                    sample_index=sequence % n,
                    token_ids=tokens[:length],
                    token_logprobs=token_logprobs[sequence, :length].tolist(),
                    finish_reason=finish_reason,
                    seed=seed,
                    tokenizer=self.tokenizer,
                    lineage=self.lineage,
                )
            )
        return rows
