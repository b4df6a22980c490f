"""Sampling responses from the policy: one `Generator` protocol, two backends, the same records.

    generator = make_generator(gen_cfg, policy_path, policy_uri)   # "auto": vLLM on a GPU, else transformers
    rows = generator.generate(prompt_rows, seed)                  # rows of records.GENERATIONS
    manifest = run_generation(store, prompts_uri, out_uri, gen_cfg, ...)   # the resumable stage

What the rows mean, for both backends:
- Prompts are tokenized by `alignment_core.rendering.render_prompt_ids` (the chat template with the generation
  prompt), the same tokens training sees; prompts too long for `max_model_len` are skipped and counted.
- `response_token_ids` are the sampled tokens, including the final EOS when the model stopped
  (`finish_reason="stop"`); `"length"` means `max_new_tokens` ran out. `response` is those ids decoded
  without special tokens.
- `token_logprobs` are the model's raw log-probs of each sampled token: log_softmax of the logits *before*
  temperature and top-p. That is vLLM's default `logprobs_mode="raw_logprobs"` and, in the transformers
  backend, `output_logits` (not the processed `output_scores`). They are therefore the policy's own
  log-probs, the quantity a teacher-forced forward pass gives, whatever the sampling temperature;
  `sum_logprob` is their sum (the sequence log-prob under the policy).
- `seed` is the shard's seed (`shard_seed`); `generation_id` is a short sha256 of (prompt_id, policy_digest,
  seed, sample_index); `policy_digest` is `models.model_digest` of the policy folder.
"""

from alignment_core.generation.common import Generator, generation_id, request_seed, shard_seed
from alignment_core.generation.stage import choose_backend, make_generator, run_generation

__all__ = [
    "Generator",
    "choose_backend",
    "generation_id",
    "make_generator",
    "request_seed",
    "run_generation",
    "shard_seed",
]
