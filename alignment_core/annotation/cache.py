"""Judge answers cached by content in the store, so a resumed stage or a re-label never asks twice.

A judge call is identified by what decides its answer: the rendered judge prompt (the prompt and responses
in the template), the template's digest, the judge (backend; an HTTP judge's endpoint and served model name,
or a local model's digest; its declared `judge.version`), its sampling (temperature 0, max_new_tokens, top
log-probs) and the answer options. The identity is written beside the answers as `_judge.json`. Answers live
under

    {store root}/_judge_cache/{judge digest}/{key[:2]}/{key}.json      key = sha256 of the call

one small JSON file per answer, written as soon as a chunk of requests is answered (a stage killed halfway
keeps what it paid for). Only answers are cached; a request that failed (HTTP error, timeout) is not, so a
rerun asks again. The folder starts with "_": it is not listed as a run.
"""

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from alignment_core.annotation.backends import JudgeBackend, JudgeReply, Options
from alignment_core.models import model_digest
from alignment_core.redact import redact

log = logging.getLogger(__name__)

CACHE_FOLDER = "_judge_cache"


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class JudgeCache:
    """Reads and writes cached judge answers of one judge (`identity`) under a store."""

    def __init__(self, store, identity: dict):
        self.store, self.identity = store, identity
        self.folder = store.uri(CACHE_FOLDER, _sha256(identity)[:16])
        self._written_identity = False

    def key(self, prompt: str, options: Options | None) -> str:
        return _sha256({"judge": self.identity, "prompt": prompt, "options": options})

    def _uri(self, key: str) -> str:
        return f"{self.folder}/{key[:2]}/{key}.json"

    def get_many(self, keys: set[str]) -> dict[str, JudgeReply]:
        """The cached answers among `keys` (one listing of the judge's folder, then one read per hit)."""
        fs = self.store.fs
        try:
            fs.invalidate_cache()
            present = {path.rsplit("/", 1)[-1].removesuffix(".json"): path
                       for path in fs.find(self.store._path(self.folder)) if path.endswith(".json")}
        except FileNotFoundError:
            return {}
        paths = [present[key] for key in keys if key in present]
        if not paths:
            return {}
        found = {}
        for data in fs.cat(paths, on_error="omit").values():
            try:
                entry = json.loads(data)
                reply = entry["reply"]
            except (ValueError, KeyError):  # a damaged entry is a miss: asked again and rewritten
                continue
            found[entry["key"]] = JudgeReply(text=reply.get("text"), logprobs=reply.get("logprobs"),
                                             raw={**reply.get("raw", {}), "cached": True})
        return found

    def put_many(self, replies: dict[str, tuple[str, JudgeReply]]) -> None:
        """Store answers: key -> (judge prompt, reply); replies with an error are never stored."""
        if not self._written_identity:
            self.store.write_json(f"{self.folder}/_judge.json", self.identity)
            self._written_identity = True
        for key, (prompt, reply) in replies.items():
            if reply.error is not None:
                continue
            entry = {"key": key, "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                     "reply": {"text": reply.text, "logprobs": reply.logprobs, "raw": reply.raw},
                     "created_at": time.time()}
            self.store.write_bytes(self._uri(key), redact(json.dumps(entry, sort_keys=True, default=str)).encode())


class CachedJudgeBackend:
    """A judge backend that asks its inner backend only for answers the cache does not hold.

    Requests go out in chunks of `chunk_size` (each chunk's answers are stored before the next is sent);
    identical prompts in one call are asked once. `requests_sent` and `cache_hits` count what happened.
    """

    def __init__(self, backend: JudgeBackend, cache: JudgeCache, chunk_size: int = 32):
        self.backend, self.cache, self.chunk_size = backend, cache, chunk_size
        self.name = backend.name
        self.requests_sent = self.cache_hits = 0

    def complete(self, prompts: Sequence[str], options: Options | None) -> list[JudgeReply]:
        keys = [self.cache.key(prompt, options) for prompt in prompts]
        answers = self.cache.get_many(set(keys))
        hits = sum(key in answers for key in keys)
        self.cache_hits += hits
        missing = list(dict.fromkeys(key for key in keys if key not in answers))
        prompt_of = dict(zip(keys, prompts, strict=True))
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            replies = self.backend.complete([prompt_of[key] for key in chunk], options)
            self.requests_sent += len(chunk)
            answers.update(zip(chunk, replies, strict=True))
            self.cache.put_many({key: (prompt_of[key], reply) for key, reply in zip(chunk, replies, strict=True)})
        if hits:
            log.info("judge cache: %d of %d answers reused, %d asked", hits, len(keys), len(missing))
        return [answers[key] for key in keys]

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()


def judge_identity(cfg, backend: JudgeBackend, template_name: str, options_kind: str) -> dict:
    """What identifies a judge's answers besides the prompt: backend, endpoint, model, declared version, template
    digest, sampling."""
    judge = cfg.annotation.judge
    identity = {"backend": judge.backend, "version": judge.version}
    if judge.backend == "http":
        # The server is asked, its weights are not ours to hash: two servers may serve different judges under
        # one model name, so the endpoint is part of who answers (and judge.version a change behind it).
        identity |= {"endpoint": endpoint_identity(judge.base_url), "model": judge.model}
    else:
        identity["model"] = "digest:" + model_digest(getattr(backend, "path", None) or judge.model)
    return {**identity, "template": template_name, "kind": options_kind,
            "sampling": {"temperature": 0.0, "max_new_tokens": judge.max_new_tokens, "top_logprobs": 5}}


def endpoint_identity(base_url: str) -> str:
    """scheme://host:port/path of a URL: where the judge is, without credentials, query or fragment (they may hold
    secrets, and do not say which server answers)."""
    parts = urlsplit(base_url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"
