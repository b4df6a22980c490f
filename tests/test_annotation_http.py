"""The HTTP judge against a real OpenAI-compatible server on loopback, started by the test.

The server speaks the chat-completions schema and answers by script, keyed on which responses the judge
prompt shows: one with log-probs, one in plain text, one garbage, one 500-then-success, one 400, one slower
than the client's timeout. It records every request so the test can check what the client sent.
"""

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignment_core.annotation import (
    AnnotationFailureError,
    HttpJudgeBackend,
    PairwiseJudgeAnnotator,
    PointwiseJudgeAnnotator,
    ScoreRules,
    load_template,
    run_annotation,
)
from alignment_core.config import PipelineConfig
from alignment_core.store import ArtifactStore
from tests.test_annotation import make_generations, write_generations

API_KEY = "sk-test-not-a-real-key"
SLOW_S = 1.5  # the "slow" script sleeps this long; the client's timeout is shorter


def completion(content: str, top: list[tuple[str, float]] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": top[0][0],
                    "logprob": top[0][1],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
                }
            ]
        }
    return {"id": "cmpl-1", "object": "chat.completion", "model": "judge-model", "choices": [choice]}


class ScriptedJudge:
    """Answers by what the judge prompt shows; where it gives a verdict, the "good" response wins."""

    def __init__(self):
        self.requests: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()

    def answer(self, headers: dict, body: dict) -> tuple[int, dict | str]:
        prompt = body["messages"][0]["content"]
        with self.lock:
            self.requests.append({"headers": headers, "body": body})
            self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
            attempt = self.attempts[prompt]
        if "Is this response desirable?" in prompt:  # pointwise: yes for "good", with log-probs
            yes = "good" in prompt.split("[Response]")[1]
            return 200, completion(
                "yes" if yes else "no", [("yes", -0.2), ("no", -1.8)] if yes else [("no", -0.1), ("No", -2.5)]
            )
        good_first = prompt.index("good") < prompt.index("bad") if "good" in prompt else True
        letter = "A" if good_first else "B"
        if "alpha" in prompt:  # log-probs: the letter, and the other one 2.5 nats lower
            other = "B" if letter == "A" else "A"
            return 200, completion(letter, [(letter, -0.05), (other, -2.55), ("The", -4.0)])
        if "beta" in prompt:  # plain text, no log-probs
            return 200, completion(f"Response {letter}.")
        if "gamma" in prompt:  # garbage
            return 200, completion("Both responses have merits; it depends.")
        if "delta" in prompt:  # a transient failure, then an answer
            return (500, "overloaded") if attempt == 1 else (200, completion(letter))
        if "zeta" in prompt:  # a client error: not retried
            return 400, {"error": {"message": "bad request"}}
        if "epsilon" in prompt:  # slower than the client's timeout, every time
            time.sleep(SLOW_S)
            return 200, completion(letter)
        return 404, "no script"


@contextmanager
def scripted_server(script) -> Iterator[str]:
    """A real OpenAI-compatible server on a loopback port: `script.answer(headers, body)` -> (status, payload)
    answers each chat completion request. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                status, payload = 404, "unknown path"
            else:
                status, payload = script.answer(dict(self.headers), body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                pass

    with serving(Handler) as url:
        yield url


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` on a loopback port, quietly, until the block ends; yields the server's /v1 base URL."""
    handler.log_message = lambda self, *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def judge_server():
    script = ScriptedJudge()
    with scripted_server(script) as url:
        yield url, script


PAIRS = {
    "alpha": ["alpha bad answer", "alpha good answer"],
    "beta": ["beta good answer", "beta bad answer"],
    "gamma": ["gamma good answer", "gamma bad answer"],
    "delta": ["delta bad answer", "delta good answer"],
    "epsilon": ["epsilon good answer", "epsilon bad answer"],
    "zeta": ["zeta good answer", "zeta bad answer"],
}


def test_http_pairwise_judge(judge_server, monkeypatch):
    base_url, script = judge_server
    monkeypatch.setenv("JUDGE_TEST_KEY", API_KEY)
    backend = HttpJudgeBackend(
        base_url,
        "judge-model",
        api_key_env="JUDGE_TEST_KEY",
        timeout_s=0.5,
        max_retries=1,
        concurrency=4,
        max_new_tokens=4,
        backoff_s=0.01,
    )
    generations = make_generations(PAIRS)
    started = time.monotonic()
    rows = {
        row["prompt_id"]: row
        for row in PairwiseJudgeAnnotator(backend, load_template("helpfulness")).annotate(generations)
    }
    elapsed = time.monotonic() - started

    # What the server received: the key from the environment, the chat-completions body.
    assert {r["headers"]["Authorization"] for r in script.requests} == {f"Bearer {API_KEY}"}
    body = script.requests[0]["body"]
    assert body["model"] == "judge-model" and body["max_tokens"] == 4 and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["messages"][0]["role"] == "user" and "[Response A]" in body["messages"][0]["content"]
    prompts_of = lambda key: [p for p in script.attempts if key in p]  # noqa: E731
    assert all(len(prompts_of(key)) == 2 for key in PAIRS)  # every pair in both orders
    assert [script.attempts[p] for p in prompts_of("delta")] == [2, 2]  # 500, then retried
    assert [script.attempts[p] for p in prompts_of("zeta")] == [1, 1]  # 400: not retried
    assert [script.attempts[p] for p in prompts_of("epsilon")] == [2, 2]  # timed out twice (1 retry)
    assert elapsed < 2 * SLOW_S + 1  # timeouts cut the slow answers short

    alpha = rows["alpha"]  # log-probs read, both orders agree on the good answer
    assert (alpha["status"], alpha["agreement"], alpha["generation1_id"]) == ("ok", True, "alpha-g1")
    assert alpha["confidence"] == pytest.approx(2.5)
    assert [o["source"] for o in json.loads(alpha["raw"])["orders"]] == ["logprobs", "logprobs"]
    beta = rows["beta"]  # text parsed: a verdict, no confidence
    assert (beta["status"], beta["agreement"], beta["generation1_id"], beta["confidence"]) == (
        "ok",
        True,
        "beta-g0",
        None,
    )
    assert (rows["delta"]["status"], rows["delta"]["generation1_id"]) == ("ok", "delta-g1")
    assert json.loads(rows["delta"]["raw"])["orders"][0]["attempts"] == 2
    gamma = rows["gamma"]  # garbage: counted as unparseable, no label, raw kept
    assert (gamma["status"], gamma["generation1_reward"], gamma["generation2_reward"]) == (
        "unparseable",
        None,
        None,
    )
    assert "it depends" in gamma["raw"]
    assert rows["epsilon"]["status"] == "error" and "Timeout" in rows["epsilon"]["raw"]
    assert rows["zeta"]["status"] == "error" and "HTTP 400" in rows["zeta"]["raw"]
    assert all(API_KEY not in row["raw"] for row in rows.values())  # the key is never stored


def test_http_pointwise_judge_uses_logprobs(judge_server, monkeypatch):
    base_url, script = judge_server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = HttpJudgeBackend(base_url, "judge-model", timeout_s=5, max_retries=0, backoff_s=0.01)
    annotator = PointwiseJudgeAnnotator(
        backend, load_template("helpfulness", "_yes_no"), ScoreRules(mode="labels")
    )
    rows = annotator.annotate(make_generations({"p": ["a good answer", "a poor answer"]}))
    assert "Authorization" not in script.requests[0]["headers"]  # no key in the environment: none sent
    assert [(r["status"], r["generation1_reward"]) for r in rows] == [("ok", 1.0), ("ok", 0.0)]
    assert rows[0]["score1"] == pytest.approx(1 / (1 + math.exp(-1.6)))
    # "no" listed, "yes" absent from the top log-probs: the text decides, the score is 0
    assert rows[1]["score1"] == 0.0 and json.loads(rows[1]["raw"])["source"] == "text"


def test_http_judge_stage_failure_guard(judge_server, monkeypatch, tmp_path):
    base_url, _ = judge_server
    monkeypatch.setenv("JUDGE_TEST_KEY", API_KEY)
    store = ArtifactStore(str(tmp_path))
    garbage_heavy = {key: PAIRS[key] for key in ("alpha", "beta", "gamma", "zeta")}  # 2 of 4 fail
    generations_uri = write_generations(store, make_generations(garbage_heavy))
    judge = {
        "backend": "http",
        "base_url": base_url,
        "model": "judge-model",
        "api_key_env": "JUDGE_TEST_KEY",
        "max_retries": 0,
    }
    cfg = PipelineConfig.model_validate(
        {"annotation": {"annotator": "judge_pairwise", "judge": judge, "max_failure_fraction": 0.25}}
    )
    out = store.stage_uri("run", 0, "annotations")
    with pytest.raises(
        AnnotationFailureError, match=r"2 of 4 annotations failed \(50.0% > .*unparseable 1, error 1"
    ):
        run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert store.read_manifest(out) is None

    cfg.annotation.max_failure_fraction = 0.5
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 2})
    assert manifest["extra"]["counts"] == {"error": 1, "ok": 2, "unparseable": 1}
    assert manifest["extra"]["failure_fraction"] == 0.5
    table = store.read_pandas(out)
    labelled = table[table["status"] == "ok"]
    assert set(labelled["generation1_id"]) == {"alpha-g1", "beta-g0"}  # the good answers, never the failures


# ---- transient failures are retried by a rerun, answers are cached, each request has a deadline ------------
class OutageJudge:
    """Answers every pairwise prompt with the letter of its "good" response (log-probs), except while down:
    then every request gets a 503. Goes down after `up_for` answered requests; counts what it received."""

    def __init__(self, up_for: int):
        self.up_for, self.down, self.answered = up_for, False, 0
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def answer(self, headers: dict, body: dict) -> tuple[int, dict | str]:
        prompt = body["messages"][0]["content"]
        with self.lock:
            self.requests.append(prompt)
            if self.answered >= self.up_for:
                self.down = True
            if self.down:
                self.failed.append(prompt)
                return 503, "down for maintenance"
            self.answered += 1
        letter = "A" if prompt.index("good") < prompt.index("bad") else "B"
        return 200, completion(letter, [(letter, -0.05), ("B" if letter == "A" else "A", -2.55)])

    def come_back(self) -> None:
        with self.lock:
            self.down, self.up_for = False, 10**9


@pytest.fixture
def outage_judge():
    script = OutageJudge(up_for=5)
    with scripted_server(script) as url:
        yield url, script


SIX_PAIRS = {f"p{i}": [f"answer {i} bad", f"answer {i} good"] for i in range(6)}


def outage_config(base_url: str, max_failure_fraction: float) -> PipelineConfig:
    judge = {"backend": "http", "base_url": base_url, "model": "judge-model", "max_retries": 0, "concurrency": 1}
    return PipelineConfig.model_validate({
        "generation": {"shard_size": 2},
        "annotation": {"annotator": "judge_pairwise", "judge": judge, "max_failure_fraction": max_failure_fraction},
    })


@pytest.mark.fault("judge fails mid-stage and comes back")
def test_rerun_after_a_judge_outage_sends_only_the_failed_requests(outage_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    base_url, script = outage_judge
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(SIX_PAIRS))
    out = store.stage_uri("run", 0, "annotations")
    cfg = outage_config(base_url, max_failure_fraction=0.2)
    # 6 pairs x 2 orders = 12 requests; the judge goes down after 5: pair 2 loses its second order, pairs 3-5 both
    with pytest.raises(AnnotationFailureError, match=r"4 of 6 annotations failed.*4 failed for a transient reason"):
        run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert len(script.requests) == 12 and len(script.failed) == 7
    failed = list(script.failed)

    # Still down: the rerun asks again (it does not reuse the failed rows) and fails again.
    script.requests.clear()
    script.failed.clear()
    with pytest.raises(AnnotationFailureError):
        run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert sorted(script.requests) == sorted(failed)  # only the failed ones: the 5 answers came from the cache

    script.come_back()
    script.requests.clear()
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert sorted(script.requests) == sorted(failed)  # exactly the requests that failed, once each
    assert manifest["extra"]["counts"] == {"ok": 6} and manifest["extra"]["transient_failures"] == 0
    table = store.read_pandas(out)
    assert list(table["prompt_id"]) == list(SIX_PAIRS)  # rows in prompt order, each prompt once
    assert set(table["generation1_id"]) == {f"p{i}-g1" for i in range(6)}  # the good answers won

    # Complete now: nothing is asked again; a re-label of the same generations by the same judge (another stage
    # folder, e.g. a new run under the same store) is answered by the cache.
    script.requests.clear()
    run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    relabelled = run_annotation(store, generations_uri, store.stage_uri("other", 0, "annotations"), cfg, {"fp": 1})
    assert script.requests == [] and relabelled["extra"]["counts"] == {"ok": 6}


@pytest.mark.fault("judge transient failures retried by the next run")
def test_transient_failures_under_the_threshold_are_retried_by_the_next_run(outage_judge, tmp_path, monkeypatch):
    """A stage that completed with a few transient failures is not final: the next run of the pipeline's
    annotate stage asks again for those, keeps the rest, and the new labels reach what is built from them."""
    from alignment_core import pipeline

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    base_url, script = outage_judge
    script.up_for = 10  # pairs 0-4 answered, pair 5 fails
    cfg = outage_config(base_url, max_failure_fraction=0.5)
    cfg.store.root, cfg.store.run_name, cfg.setup = str(tmp_path), "run", "online_pairwise"
    store = pipeline.open_store(cfg)
    generations_uri = write_generations(store, make_generations(SIX_PAIRS))
    out = pipeline.annotate(cfg, generations_uri, 1)
    first = store.read_manifest(out)
    assert first["extra"]["counts"] == {"error": 1, "ok": 5} and first["extra"]["transient_failures"] == 1
    failed = list(script.failed)
    assert len(failed) == 2

    script.come_back()
    script.requests.clear()
    assert pipeline.annotate(cfg, generations_uri, 1) == out
    second = store.read_manifest(out)
    assert sorted(script.requests) == sorted(failed)
    assert second["extra"]["counts"] == {"ok": 6} and second["extra"]["transient_failures"] == 0
    assert second["fingerprint_digest"] == first["fingerprint_digest"]
    assert pipeline.stage_digest(store, out) != first["fingerprint_digest"] + "+" + first["extra"]["labels_digest"]


class TricklingJudge:
    """Sends the status line and headers at once, then the body one byte every `interval_s` seconds: every
    read returns within a per-read timeout, the whole answer takes len(body) * interval_s."""

    def __init__(self, interval_s: float):
        self.interval_s, self.requests = interval_s, 0


@pytest.fixture
def trickling_judge():
    script = TricklingJudge(interval_s=0.25)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            script.requests += 1
            data = json.dumps(completion("A")).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.flush()
                for byte in data:
                    time.sleep(script.interval_s)
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                pass

    with serving(Handler) as url:
        yield url, script


@pytest.mark.fault("trickling judge (deadline)")
def test_http_judge_deadline_cuts_off_a_trickling_server(trickling_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    base_url, script = trickling_judge
    assert len(json.dumps(completion("A"))) * script.interval_s > 10  # a whole answer takes over 10 s
    backend = HttpJudgeBackend(base_url, "judge-model", timeout_s=1.0, max_retries=0, backoff_s=0.01)
    started = time.monotonic()
    rows = PairwiseJudgeAnnotator(backend, load_template("helpfulness")).annotate(
        make_generations({"p": ["first", "second"]}))
    assert time.monotonic() - started < 3  # one deadline per request (both orders in parallel), not per read
    assert rows[0]["status"] == "error"
    raw = json.loads(rows[0]["raw"])
    assert raw["transient"] is True and "within 1 s" in json.dumps(raw)

    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations({"p": ["first", "second"]}))
    judge = {"backend": "http", "base_url": base_url, "model": "judge-model", "max_retries": 1, "timeout_s": 1.0}
    cfg = PipelineConfig.model_validate({"annotation": {"annotator": "judge_pairwise", "judge": judge}})
    started = time.monotonic()
    with pytest.raises(AnnotationFailureError, match="1 failed for a transient reason"):
        run_annotation(store, generations_uri, store.stage_uri("run", 0, "annotations"), cfg, {"fp": 1})
    assert time.monotonic() - started < 2 * 1.0 + 0.5 * 2 + 2  # two attempts of 1 s, a backoff, slack
