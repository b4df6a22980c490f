"""The HTTP judge against a real OpenAI-compatible server on loopback, started by the test.

The server speaks the chat-completions schema and answers by script, keyed on which responses the judge
prompt shows: one with log-probs, one in plain text, one garbage, one 500-then-success, one 400, one slower
than the client's timeout. It records every request so the test can check what the client sent.
"""

import json
import math
import threading
import time
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


@pytest.fixture
def judge_server():
    script = ScriptedJudge()

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

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    server.shutdown()
    server.server_close()


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
