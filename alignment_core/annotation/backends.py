"""Where a judge's answers come from: a local causal LM, or an OpenAI-compatible HTTP endpoint.

A backend takes rendered judge prompts (one user message each) and returns one `JudgeReply` per prompt:
the log-prob of each candidate answer as the next token where the backend can give it, the answer text
where it generated one, or the error that stopped it. Reading a verdict out of a reply is the judge's
job (alignment_core.annotation.judge), not the backend's.

`options` maps each answer to the spellings that count as it, e.g. {"A": ["A"], "B": ["B"]} or
{"yes": ["yes", "Yes"], "no": ["no", "No"]}; a leading space is always accepted too.
"""

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import torch

from alignment_core.errors import PermanentError, http_status_failure
from alignment_core.models import load_causal_lm, load_tokenizer, resolve_model_path
from alignment_core.redact import redact
from alignment_core.rendering import render_prompt_ids, render_prompt_text

log = logging.getLogger(__name__)

Options = dict[str, list[str]]


@dataclass
class JudgeReply:
    text: str | None = None  # the generated answer, when the backend generated one
    logprobs: dict[str, float] | None = None  # next-token log-prob of each option the backend saw
    error: str | None = None  # why there is no answer (HTTP error, timeout, budget spent)
    transient: bool = True  # the error may pass (an outage, a timeout): a rerun of the stage asks again; False for
    # one that would not (alignment_core.errors), final. A reply that is there but holds no verdict, or is
    # malformed, has no error: it is "unparseable", final.
    raw: dict = field(default_factory=dict)  # backend details kept in the annotation row (raw["malformed"]: why a
    # reply could not be read, naming the judge)


class JudgeBackend(Protocol):
    name: str

    def complete(self, prompts: Sequence[str], options: Options | None) -> list[JudgeReply]:
        """One reply per prompt. `options=None` asks for free text (e.g. a 1-10 score)."""
        ...


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def option_token_ids(tokenizer, options: Options, judge: str) -> dict[str, list[int]]:
    """The single-token spellings of each option; an option no single token spells is an error."""
    token_ids = {}
    for option, spellings in options.items():
        ids = set()
        for spelling in spellings:
            for variant in (spelling, " " + spelling):
                encoded = tokenizer.encode(variant, add_special_tokens=False)
                if len(encoded) == 1:
                    ids.add(encoded[0])
        if not ids:
            raise ValueError(
                f"judge tokenizer of {judge!r} has no single token for the answer {option!r} "
                f"(spellings {spellings}); its next-token log-probs cannot be read"
            )
        token_ids[option] = sorted(ids)
    return token_ids


class LocalJudgeBackend:
    """A transformers causal LM as judge.

    With options, the verdict is read from the next-token distribution after the rendered prompt (chat
    template of the judge's own tokenizer, generation prompt added): each option's log-prob is the
    log-sum-exp over the single tokens that spell it. Without options the model answers greedily in text.
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        max_new_tokens: int = 8,
        dtype: str = "float32",
        device: str | None = None,
    ):
        path = resolve_model_path(model)
        self.path = path
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"  # the next token of every row is then at the last position
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(path, dtype=dtype).to(self.device).eval()
        self.name = model
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def option_token_ids(self, options: Options) -> dict[str, list[int]]:
        return option_token_ids(self.tokenizer, options, self.name)

    def _encode(self, prompts: Sequence[str]):
        texts = [render_prompt_text(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        # A chat template writes its own BOS; a plain prompt gets the tokenizer's (as batches.py does).
        special = self.tokenizer.chat_template is None
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        return batch.to(self.device)

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], options: Options | None) -> list[JudgeReply]:
        token_ids = self.option_token_ids(options) if options is not None else None
        replies = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size])
            if token_ids is None:
                replies += self._generate_text(batch)
                continue
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            next_token = torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu()
            for row in next_token:
                logprobs = {opt: _logsumexp([row[i].item() for i in ids]) for opt, ids in token_ids.items()}
                replies.append(JudgeReply(logprobs=logprobs, raw={"logprobs": logprobs}))
        return replies

    def _generate_text(self, batch) -> list[JudgeReply]:
        output = self.model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(
            output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [JudgeReply(text=text, raw={"text": text}) for text in texts]


class VLLMJudgeBackend:
    """A causal LM served by an in-process vLLM engine as judge (`judge.backend: vllm`).

    The same verdicts as LocalJudgeBackend: the prompt is rendered with the judge's chat template, and each
    option's log-prob is the log-sum-exp over the single tokens that spell it. vLLM returns only the top-k
    next tokens, so each option token is appended to the prompt and its exact log-prob read back from
    `prompt_logprobs` (prefix caching makes the shared prompt cost one forward). The engine starts on first
    use and stops on `close()`.
    """

    def __init__(self, model: str, max_new_tokens: int = 8, dtype: str = "float32", max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1):
        self.path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.path)
        self.name, self.max_new_tokens = model, max_new_tokens
        self.engine_args = {"dtype": dtype, "max_model_len": max_model_len,
                            "tensor_parallel_size": tensor_parallel_size,
                            "gpu_memory_utilization": gpu_memory_utilization}
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            on_gpu = torch.cuda.is_available()
            self._llm = LLM(model=self.path, enforce_eager=not on_gpu, enable_prefix_caching=True, seed=0,
                            **self.engine_args)
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def complete(self, prompts: Sequence[str], options: Options | None) -> list[JudgeReply]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt


        prompt_ids = [render_prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        if options is None:
            greedy = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, skip_special_tokens=True)
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], greedy,
                                        use_tqdm=False)
            return [JudgeReply(text=o.outputs[0].text, raw={"text": o.outputs[0].text}) for o in outputs]
        requests = [(row, option, token) for row in range(len(prompts))
                    for option, tokens in option_token_ids(self.tokenizer, options, self.name).items()
                    for token in tokens]
        read_back = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids[row] + [token]) for row, _, token in requests], read_back,
            use_tqdm=False,
        )
        per_row: list[dict[str, list[float]]] = [{} for _ in prompts]
        unreadable: dict[int, str] = {}
        for (row, option, token), output in zip(requests, outputs, strict=True):
            logprob = read_back_logprob(output, token)
            if logprob is None:
                unreadable[row] = f"judge {self.name!r}: vLLM read back no usable log-prob for option {option!r}"
            else:
                per_row[row].setdefault(option, []).append(logprob)
        replies = []
        for row, values in enumerate(per_row):
            if row in unreadable:
                replies.append(JudgeReply(raw={"malformed": unreadable[row]}))
                continue
            logprobs = {option: _logsumexp(v) for option, v in values.items()}
            replies.append(JudgeReply(logprobs=logprobs, raw={"logprobs": logprobs}))
        return replies


def read_back_logprob(output, token: int) -> float | None:
    """The log-prob vLLM computed for `token` as the prompt's last token, or None when the output holds none
    that is a log-prob (a missing position or token, a NaN)."""
    try:
        value = output.prompt_logprobs[-1][token].logprob
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return float(value) if is_logprob(value) else None


def is_logprob(value) -> bool:
    """A finite number no larger than 0 (a little rounding above it allowed): what a log-probability can be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= 1e-4


class HttpJudgeBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, llama.cpp, hosted APIs).

    Requests ask for `logprobs: true, top_logprobs: 5` and temperature 0; when the reply carries log-probs
    for the options they are used, else the judge parses the text; a reply that is not a well-formed chat
    completion is read as no answer ("unparseable", `parse_chat_completion`), never a crash. Failures are
    bounded: a request is retried at most `max_retries` times on what alignment_core.errors calls transient
    (timeouts, 429, 5xx, connection errors), with exponential backoff (`backoff_s * 2**attempt`, or the
    server's Retry-After when longer, capped at 60 s). A permanent status is not retried: 400 fails that request
    for good; 401/403/404 (a refused key, a wrong URL or model) would fail every request, so they raise
    PermanentError and stop the stage. `timeout_s` is each attempt's deadline for the whole request (connect,
    send, headers and body), not a limit per read: a server that trickles bytes is cut off when it runs out.
    `budget_s` bounds all requests of the backend's life (a stage) together, from the first: what is not
    answered by then fails as transient (a rerun asks again). At most `concurrency` requests are in flight.
    The API key is read from the environment variable named `api_key_env` and is never logged or stored.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
        max_new_tokens: int = 8,
        backoff_s: float = 0.5,
        budget_s: float | None = None,
    ):
        if not base_url:
            raise ValueError("annotation.judge.base_url must be set for the http judge backend")
        if not model:
            raise ValueError("annotation.judge.model must name the served model for the http judge backend")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            log.warning(
                "environment variable %s is not set: judge requests go without an API key", api_key_env
            )
        self.headers, self.timeout_s = headers, timeout_s
        self.max_retries, self.concurrency = max_retries, concurrency
        self.max_new_tokens, self.backoff_s = max_new_tokens, backoff_s
        self.budget_s, self._deadline = budget_s, None  # the budget's clock starts at the first request

    def complete(self, prompts: Sequence[str], options: Options | None) -> list[JudgeReply]:
        if not prompts:
            return []
        if self.budget_s is not None and self._deadline is None:
            self._deadline = time.monotonic() + self.budget_s
        # An event loop of its own, in a thread of its own: callers may already run one (Prefect, notebooks).
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._complete_all(list(prompts), options)).result()

    def close(self) -> None:
        """Nothing to release: each `complete` call opens and closes its own connection pool."""

    def _seconds_left(self) -> float:
        return math.inf if self._deadline is None else self._deadline - time.monotonic()

    async def _complete_all(self, prompts: list[str], options: Options | None) -> list[JudgeReply]:
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(headers=self.headers, timeout=self.timeout_s, limits=limits) as client:
            slots = asyncio.Semaphore(self.concurrency)

            async def one(prompt: str) -> JudgeReply:
                async with slots:
                    return await self._complete_one(client, prompt, options)

            requests = [asyncio.ensure_future(one(prompt)) for prompt in prompts]
            try:
                return list(await asyncio.gather(*requests))
            except PermanentError:  # every other request would be refused the same way: stop them, then report
                for request in requests:
                    request.cancel()
                await asyncio.gather(*requests, return_exceptions=True)
                raise

    async def _complete_one(self, client: httpx.AsyncClient, prompt: str, options: Options | None) -> JudgeReply:
        body = {
            "model": self.name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 5,
        }
        answer, attempts, error, transient = await self._post_with_retries(client, body)
        if answer is None:
            return JudgeReply(error=error, transient=transient, raw={"error": error, "attempts": attempts})
        reply = parse_chat_completion(answer, options, self.name)
        reply.raw["attempts"] = attempts
        return reply

    async def _post_with_retries(self, client: httpx.AsyncClient,
                                 body: dict) -> tuple[bytes | None, int, str | None, bool]:
        """(the 200 answer's body or None, attempts made, last error, whether that error may pass)."""
        error = None
        for attempt in range(self.max_retries + 1):
            seconds_left = self._seconds_left()
            if seconds_left <= 0:
                error = (f"the judge's budget of {self.budget_s:g} s for the stage's requests (annotation.judge."
                         "budget_s) was spent before this one was answered"
                         + (f"; last error: {error}" if error else ""))
                return None, attempt, error, True
            timeout = min(self.timeout_s, seconds_left)
            wait = self.backoff_s * 2**attempt
            try:
                # The whole request under one deadline: httpx's own timeout is per read, and a server that
                # sends a byte now and then would never trip it.
                response = await asyncio.wait_for(client.post(self.url, json=body), timeout=timeout)
            except TimeoutError:
                limit = "annotation.judge.timeout_s" if timeout == self.timeout_s else "annotation.judge.budget_s"
                error = f"TimeoutError: no complete answer within {timeout:g} s ({limit})"
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response.content, attempt + 1, None, True
                failure = http_status_failure(response.status_code)
                error = redact(f"HTTP {response.status_code} ({failure.meaning}): {response.text[:300]}")  # bodies
                if not failure.transient:  # can echo keys
                    if failure.fails_every_request:
                        raise PermanentError(f"judge {self.name!r} at {self.url} answered {error}; not retried")
                    return None, attempt + 1, error, False
                wait = max(wait, _retry_after_s(response))
            if attempt < self.max_retries:
                log.info(
                    "judge request failed (%s); retry %d/%d in %.2fs",
                    error,
                    attempt + 1,
                    self.max_retries,
                    wait,
                )
                await asyncio.sleep(max(0.0, min(wait, 60.0, self._seconds_left())))
        return None, self.max_retries + 1, error, True


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("Retry-After", 0))
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


# ---- reading a chat completion -----------------------------------------------------------------------------
class _Malformed(ValueError):
    """A chat-completion field that is missing, null or of the wrong type."""


def parse_chat_completion(body: str | bytes, options: Options | None, judge: str) -> JudgeReply:
    """The answer text of a chat completion's body and, with options, each option's log-prob at the answer's first
    token. Never raises: a body that is not a well-formed chat completion (not JSON, a missing or mistyped field,
    a log-prob that is not one) gives a reply with no answer, which the judge reads as "unparseable", and
    raw["malformed"] says why, naming the judge.
    """
    try:
        text, positions = _completion_fields(json.loads(body))
    except (_Malformed, ValueError, RecursionError) as why:  # json.loads raises ValueError on a body not JSON
        excerpt = body[:300] if isinstance(body, str) else bytes(body[:300]).decode(errors="replace")
        reason = why if isinstance(why, _Malformed) else f"the body is not JSON ({type(why).__name__})"
        return JudgeReply(raw={"malformed": redact(f"judge {judge!r}: {reason}"), "body": redact(excerpt)})
    top = _first_answer_top_logprobs(positions)
    logprobs = _option_logprobs(top, options) if options is not None else None
    return JudgeReply(text=text, logprobs=logprobs, raw={"text": text, "top_logprobs": top})


def _field(container, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(container, dict):
        raise _Malformed(f"{where} is {type(container).__name__}, not an object")
    if key not in container:
        raise _Malformed(f"{where}.{key} is missing")
    value = container[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # no field of a completion is a bool
        raise _Malformed(f"{where}.{key} is {type(value).__name__} {repr(value)[:60]}, not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _logprob(container, where: str) -> float:
    value = _field(container, "logprob", (int, float), where)
    if not is_logprob(value):
        raise _Malformed(f"{where}.logprob is {value!r}, not a log-probability (a finite number <= 0)")
    return float(value)


def _optional_list(container: dict, key: str, where: str) -> list:
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{where}.{key} is {type(value).__name__} {repr(value)[:60]}, not a list")
    return value


def _completion_fields(payload) -> tuple[str, list[tuple[str, float, list[tuple[str, float]]]]]:
    """(answer text, [(token, log-prob, [(alternative token, log-prob)]) per generated position])."""
    choices = _field(payload, "choices", list, "the body")
    if not choices:
        raise _Malformed("the body's choices list is empty")
    choice = choices[0]
    text = _field(_field(choice, "message", dict, "choices[0]"), "content", str, "choices[0].message")
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return text, []
    if not isinstance(logprobs, dict):
        raise _Malformed(f"choices[0].logprobs is {type(logprobs).__name__}, not an object")
    positions = []
    for i, position in enumerate(_optional_list(logprobs, "content", "choices[0].logprobs")):
        where = f"choices[0].logprobs.content[{i}]"
        token, logprob = _field(position, "token", str, where), _logprob(position, where)
        alternatives = [(_field(entry, "token", str, f"{where}.top_logprobs[{j}]"),
                         _logprob(entry, f"{where}.top_logprobs[{j}]"))
                        for j, entry in enumerate(_optional_list(position, "top_logprobs", where))]
        positions.append((token, logprob, alternatives))
    return text, positions


def _first_answer_top_logprobs(positions: list[tuple[str, float, list[tuple[str, float]]]]) -> list[dict] | None:
    """The top log-probs at the first generated token that is not blank (the answer's first token)."""
    for token, logprob, alternatives in positions:
        if token.strip():
            return [{"token": token, "logprob": logprob},
                    *[{"token": t, "logprob": lp} for t, lp in alternatives if t != token]]
    return None


def _option_logprobs(top: list[dict] | None, options: Options) -> dict[str, float] | None:
    """Each listed option's log-prob (log-sum-exp over its spellings); None when no option is listed."""
    if not top:
        return None
    found: dict[str, list[float]] = {}
    for entry in top:
        token = entry["token"].strip()
        for option, spellings in options.items():
            if token in spellings:
                found.setdefault(option, []).append(entry["logprob"])
    return {option: _logsumexp(values) for option, values in found.items()} or None
