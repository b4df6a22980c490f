"""The judge against what a reviewer threw at it (issue 19 A), with real loopback judge servers:

- answers cached per judge *endpoint* and declared version, not per served model name alone;
- malformed answers of every shape read as "unparseable" rows naming the judge, never an exception;
- one table of which failures are transient (alignment_core.errors), read by the stage and the judge's retries;
- templates bounded in range(), output size and render time (preflight renders one);
- a stage's requests bounded together by judge.budget_s.
"""

import errno
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import httpx
import pytest

from alignment_core.annotation import (
    AnnotationFailureError,
    load_template,
    run_annotation,
)
from alignment_core.annotation.backends import JudgeReply, parse_chat_completion, read_back_logprob
from alignment_core.annotation.cache import CACHE_FOLDER, endpoint_identity
from alignment_core.annotation.judge import PAIRWISE_OPTIONS, JudgeTemplate, TemplateBoundError, read_choice
from alignment_core.config import PipelineConfig
from alignment_core.errors import PermanentError, is_transient
from alignment_core.preflight import is_transient as preflight_is_transient
from alignment_core.preflight import library_problems, quick_problems
from alignment_core.store import ArtifactStore
from tests.conftest import fault_note
from tests.test_annotation import make_generations, write_generations
from tests.test_annotation_http import (  # noqa: F401 (trickling_judge: a fixture)
    completion,
    scripted_server,
    serving,
    trickling_judge,
)

PAIRS = {f"p{i}": [f"answer {i} bad", f"answer {i} good"] for i in range(3)}


def judge_config(base_url: str, **judge) -> PipelineConfig:
    return PipelineConfig.model_validate({"annotation": {"annotator": "judge_pairwise", "judge": {
        "backend": "http", "base_url": base_url, "model": "judge-model", "max_retries": 0, **judge}}})


class OpinionatedJudge:
    """Prefers the response with `favourite` in it ("good" or "bad"), with log-probs; counts its requests."""

    def __init__(self, favourite: str):
        self.favourite, self.requests, self.lock = favourite, [], threading.Lock()

    def answer(self, headers: dict, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][0]["content"]
        with self.lock:
            self.requests.append(prompt)
        other = "bad" if self.favourite == "good" else "good"
        letter = "A" if prompt.index(self.favourite) < prompt.index(other) else "B"
        return 200, completion(letter, [(letter, -0.05), ("B" if letter == "A" else "A", -3.0)])


# ---- 1. the cache knows which judge answered ---------------------------------------------------------------
@pytest.mark.fault("two judges, one model name, one store")
def test_two_judges_serving_one_model_name_do_not_share_cached_answers(tmp_path, monkeypatch, request):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(PAIRS))
    likes_good, likes_bad = OpinionatedJudge("good"), OpinionatedJudge("bad")
    with scripted_server(likes_good) as first_url, scripted_server(likes_bad) as second_url:
        run_annotation(store, generations_uri, store.stage_uri("a", 0, "annotations"), judge_config(first_url), {})
        assert len(likes_good.requests) == 6  # 3 pairs, both orders
        run_annotation(store, generations_uri, store.stage_uri("b", 0, "annotations"), judge_config(second_url), {})
        assert len(likes_bad.requests) == 6  # asked itself: not answered from the first judge's cache
        labels = store.read_pandas(store.stage_uri("b", 0, "annotations"))
        assert set(labels["generation1_id"]) == {f"p{i}-g0" for i in range(3)}  # its own verdicts: "bad" won

        # The same judge again: answered by the cache; with a new declared version: asked again.
        run_annotation(store, generations_uri, store.stage_uri("c", 0, "annotations"), judge_config(second_url), {})
        assert len(likes_bad.requests) == 6
        run_annotation(store, generations_uri, store.stage_uri("d", 0, "annotations"),
                       judge_config(second_url, version="2026-12-weights"), {})
        assert len(likes_bad.requests) == 12
    identities = [json.loads(path.read_text()) for path in (tmp_path / CACHE_FOLDER).glob("*/_judge.json")]
    assert sorted((i["endpoint"], i["version"]) for i in identities) == sorted(
        [(endpoint_identity(first_url), ""), (endpoint_identity(second_url), ""),
         (endpoint_identity(second_url), "2026-12-weights")])
    fault_note(request, "judge 2 asked 6/6 on a store judge 1 filled; a version bump asked 6 again")


def test_the_endpoint_identity_holds_no_credentials_or_query():
    assert endpoint_identity("HTTPS://user:s3cret@Judge.Example.com/v1/?api_key=s3cret#x") == (
        "https://judge.example.com:443/v1")
    assert endpoint_identity("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert endpoint_identity("http://127.0.0.1:8000/v1") != endpoint_identity("http://127.0.0.1:8001/v1")


# ---- 2. malformed answers are unparseable rows, never a crash -------------------------------------------------
def _valid_completion() -> dict:
    return completion("A", [("A", -0.1), ("B", -2.5)])


def _with(path: tuple, value) -> dict:
    """A valid completion with the field at `path` replaced by `value` (or removed, for MISSING)."""
    payload = _valid_completion()
    container = payload
    for step in path[:-1]:
        container = container[step]
    if value is MISSING:
        del container[path[-1]]
    else:
        container[path[-1]] = value
    return payload


MISSING = object()
GARBAGE = [None, "x", "NaN", 1e308, True, [], {}, [{"nested": ["garbage", {"deeper": None}]}]]
POSITION = ("choices", 0, "logprobs", "content", 0)
TOP_ENTRY = (*POSITION, "top_logprobs", 0)
MALFORMED = (
    # required fields missing, null, or of the wrong type
    [_with(("choices",), value) for value in [MISSING, *GARBAGE] if value != []]
    + [_with(("choices", 0), value) for value in [None, "x", 7, []]]
    + [_with(("choices", 0, "message"), value) for value in [MISSING, None, "A", ["A"]]]
    + [_with(("choices", 0, "message", "content"), value) for value in [MISSING, None, 1, ["A"], {"text": "A"}]]
    # log-probs present but not log-probs: each field of a position and of its alternatives
    + [_with(("choices", 0, "logprobs"), value) for value in ["x", [], 1e308, True]]
    + [_with(("choices", 0, "logprobs", "content"), value) for value in ["x", {"0": {}}, 5]]
    + [_with((*POSITION, "token"), value) for value in [MISSING, None, 1, ["A"]]]
    + [_with((*POSITION, "logprob"), value) for value in [MISSING, None, "x", "NaN", float("nan"), float("inf"),
                                                           1e308, 0.5, True, [], {"v": -1}]]
    + [_with((*POSITION, "top_logprobs"), value) for value in ["x", {"A": -0.1}, 5]]
    + [_with((*TOP_ENTRY, "token"), value) for value in [MISSING, None, 3]]
    + [_with((*TOP_ENTRY, "logprob"), value) for value in [MISSING, None, "-0.1", float("-inf"), 1e308]]
    + [_with(POSITION[:-1], [None]), _with(POSITION[:-1], ["A"]), _with((*POSITION, "top_logprobs"), [None])]
)
NOT_A_COMPLETION = [b"", b"not json", b"<html>502 Bad Gateway</html>", b"{", b"\xff\xfe\x00", b"null", b"42",
                    b'"A"', b"[1, 2]", b'{"choices": []}', b"[" * 100_000 + b"]" * 100_000]


@pytest.mark.parametrize("options", [PAIRWISE_OPTIONS, None], ids=["logprobs", "text"])
def test_malformed_chat_completions_read_as_unparseable_naming_the_judge(options):
    bodies = [json.dumps(payload).encode() for payload in MALFORMED] + NOT_A_COMPLETION
    assert len(bodies) >= 50
    for body in bodies:
        reply = parse_chat_completion(body, options, "judge-7b")
        assert reply.error is None and reply.text is None and reply.logprobs is None, body[:200]
        assert reply.raw["malformed"].startswith("judge 'judge-7b': "), body[:200]
        verdict = read_choice(reply, PAIRWISE_OPTIONS, "judge-7b")
        assert verdict.status == "unparseable" and verdict.answer is None, body[:200]
    # the reason says what was wrong, e.g. the reviewer's two cases
    reasons = [parse_chat_completion(json.dumps(_with(path, value)), options, "judge-7b").raw["malformed"]
               for path, value in [((*POSITION, "logprob"), "x"), ((*POSITION, "token"), None)]]
    assert "choices[0].logprobs.content[0].logprob is str 'x'" in reasons[0]
    assert "choices[0].logprobs.content[0].token is NoneType None, not str" in reasons[1]


def test_a_well_formed_completion_still_reads():
    reply = parse_chat_completion(json.dumps(_valid_completion()), PAIRWISE_OPTIONS, "judge-7b")
    assert reply.text == "A" and reply.logprobs == {"A": -0.1, "B": -2.5}
    assert read_choice(reply, PAIRWISE_OPTIONS, "judge-7b").status == "ok"


@pytest.mark.parametrize("logprobs", [{"A": float("nan"), "B": -1.0}, {"A": "x", "B": -1.0}, {"A": None, "B": -1.0},
                                      {"A": float("inf"), "B": -1.0}, {"A": 1e308, "B": -1.0}, ["A", "B"], "A"])
def test_local_and_vllm_replies_with_broken_logprobs_are_unparseable(logprobs):
    """The transformers and vLLM judges hand read_choice log-probs from the model: a NaN (broken weights) or
    anything else that is not a log-probability is no verdict."""
    verdict = read_choice(JudgeReply(logprobs=logprobs, raw={}), PAIRWISE_OPTIONS, "tiny-judge")
    assert (verdict.status, verdict.answer) == ("unparseable", None)
    assert verdict.malformed.startswith("judge 'tiny-judge': log-probs")


@pytest.mark.parametrize("output", [
    SimpleNamespace(prompt_logprobs=None), SimpleNamespace(prompt_logprobs=[]), SimpleNamespace(),
    SimpleNamespace(prompt_logprobs=[{}]), SimpleNamespace(prompt_logprobs=[{5: None}]),
    SimpleNamespace(prompt_logprobs=[{5: SimpleNamespace(logprob=float("nan"))}]),
    SimpleNamespace(prompt_logprobs=[{5: SimpleNamespace(logprob="x")}]),
])
def test_vllm_read_back_of_an_unusable_output_is_none(output):
    assert read_back_logprob(output, 5) is None
    assert read_back_logprob(SimpleNamespace(prompt_logprobs=[None, {5: SimpleNamespace(logprob=-0.5)}]), 5) == -0.5


class MalformedJudge:
    """Answers each request with the next of the reviewer's malformed shapes."""

    SHAPES = [_with((*POSITION, "logprob"), "x"), _with((*POSITION, "token"), None), "not json at all",
              _with(("choices",), [])]

    def __init__(self):
        self.count, self.lock = 0, threading.Lock()

    def answer(self, headers: dict, body: dict) -> tuple[int, dict | str]:
        with self.lock:
            self.count += 1
            return 200, self.SHAPES[(self.count - 1) % len(self.SHAPES)]


@pytest.mark.fault("judge answers malformed JSON")
def test_a_stage_with_malformed_answers_counts_them_as_unparseable(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(PAIRS))
    out = store.stage_uri("r", 0, "annotations")
    with scripted_server(MalformedJudge()) as url:
        with pytest.raises(AnnotationFailureError, match=r"3 of 3 annotations failed .*unparseable 3, error 0"):
            run_annotation(store, generations_uri, out, judge_config(url), {})
        cfg = judge_config(url)
        cfg.annotation.max_failure_fraction = 1.0
        manifest = run_annotation(store, generations_uri, out, cfg, {})
    assert manifest["extra"]["counts"] == {"unparseable": 3} and manifest["extra"]["transient_failures"] == 0
    assert all("judge 'judge-model': " in raw for raw in store.read_pandas(out)["raw"])


# ---- 3. one table of transient and permanent failures --------------------------------------------------------
def _http_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://judge/v1/chat/completions")
    return httpx.HTTPStatusError(str(status), request=request, response=httpx.Response(status, request=request))


@pytest.mark.parametrize("error, transient", [
    *[(_http_error(status), False) for status in (400, 401, 403, 404)],
    *[(_http_error(status), True) for status in (429, 500, 502, 503, 504)],
    *[(OSError(code, "x"), False) for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOENT)],
    (FileNotFoundError("data.jsonl"), False), (PermissionError("store"), False),
    (TimeoutError(), True), (httpx.ReadTimeout("slow"), True), (httpx.ConnectError("refused"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True), (httpx.RemoteProtocolError("dropped"), True),
    (PermanentError("judge refused the key"), False), (ValueError("bad config"), False),
], ids=lambda value: value if isinstance(value, bool) else f"{type(value).__name__}:{getattr(value, 'errno', '')}"
                                                          f"{str(value)[:12]}")
def test_is_transient_reads_the_table(error, transient):
    assert is_transient(error) is transient
    assert preflight_is_transient is is_transient  # the stage tasks' import, the same table


class StatusJudge:
    """Answers every request with `statuses` in turn (then 200 with a verdict); counts attempts per prompt."""

    def __init__(self, *statuses: int):
        self.statuses, self.attempts, self.lock = statuses, {}, threading.Lock()

    def answer(self, headers: dict, body: dict) -> tuple[int, dict | str]:
        prompt = body["messages"][0]["content"]
        with self.lock:
            attempt = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
        if attempt <= len(self.statuses):
            return self.statuses[attempt - 1], {"error": {"message": "no"}}
        letter = "A" if prompt.index("good") < prompt.index("bad") else "B"
        return 200, completion(letter, [(letter, -0.05), ("B" if letter == "A" else "A", -3.0)])


@pytest.mark.fault("judge refuses the API key (401)")
def test_a_401_fails_the_stage_at_once_with_a_permanent_message(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(PAIRS))
    script = StatusJudge(401, 401, 401, 401)
    out = store.stage_uri("r", 0, "annotations")
    with scripted_server(script) as url:
        started = time.monotonic()
        with pytest.raises(PermanentError) as refused:
            run_annotation(store, generations_uri, out, judge_config(url, max_retries=3, concurrency=1), {})
    assert time.monotonic() - started < 2
    assert list(script.attempts.values()) == [1]  # the first request, once: no retry, no other request
    message = str(refused.value)
    assert "HTTP 401" in message and "API key" in message and "again" not in message
    assert not is_transient(refused.value)  # so the stage task is not retried either (tasks.retry_if_transient)
    assert store.read_manifest(out) is None
    assert not [path for path in store.fs.find(store._path(out)) if path.endswith(".parquet")]  # no shard kept


@pytest.mark.fault("judge 503 then 200")
def test_a_503_is_retried_and_the_stage_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(PAIRS))
    script = StatusJudge(503)
    with scripted_server(script) as url:
        manifest = run_annotation(store, generations_uri, store.stage_uri("r", 0, "annotations"),
                                  judge_config(url, max_retries=1), {})
    assert manifest["extra"]["counts"] == {"ok": 3}
    assert sorted(script.attempts.values()) == [2] * 6  # each request: the 503, then its retry answered


class RefusingModelsEndpoint(BaseHTTPRequestHandler):
    """`GET /v1/models` (what preflight asks) answered 401."""

    def do_GET(self):
        data = b'{"error": {"message": "invalid api key"}}'
        self.send_response(401)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_preflight_reports_a_refused_key_as_a_permanent_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with serving(RefusingModelsEndpoint) as url:
        cfg = judge_config(url)
        cfg.store.root = str(tmp_path)
        problems = [p for p in quick_problems(cfg) if p.startswith("annotation.judge.base_url")]
    assert len(problems) == 1 and "answered HTTP 401: the server refused the credentials" in problems[0]


def test_a_400_fails_its_request_for_good(tmp_path, monkeypatch):
    """A 400 is about the request (e.g. a prompt too long): that row is a final error, the others are labelled,
    and a rerun does not ask again."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(PAIRS))
    script = StatusJudge(400)
    with scripted_server(script) as url:
        with pytest.raises(AnnotationFailureError) as failed:
            run_annotation(store, generations_uri, store.stage_uri("r", 0, "annotations"),
                           judge_config(url, max_retries=3), {})
    assert "error 3" in str(failed.value) and "run the stage again" not in str(failed.value)
    assert sorted(script.attempts.values()) == [1] * 6


# ---- 4. templates bounded ---------------------------------------------------------------------------------
BOMBS = {
    "the reviewer's": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "loops under the range cap, no output": "{% for i in range(10000) %}{% for j in range(10000) %}"
                                            "{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
    "output": "{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "repetition": "{{ prompt * 1000000000 }}",
}


@pytest.mark.fault("judge template bomb")
@pytest.mark.timeout(20)  # without the bounds the reviewer's bomb runs for hours: this ends it
@pytest.mark.parametrize("source", BOMBS.values(), ids=BOMBS.keys())
def test_a_template_bomb_fails_fast_naming_the_template(source):
    started = time.monotonic()
    with pytest.raises(TemplateBoundError, match=r"judge template bomb@0 .*; refused"):
        JudgeTemplate(name="bomb@0", source=source).render(prompt="p", response_a="a", response_b="b")
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_preflight_renders_the_template_once(tmp_path):
    template = tmp_path / "bomb.jinja"
    template.write_text(BOMBS["the reviewer's"])
    cfg = PipelineConfig.model_validate({"annotation": {"annotator": "judge_pairwise", "judge": {
        "backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m", "template": str(template)}}})
    started = time.monotonic()
    problems = [p for p in library_problems(cfg) if p.startswith("annotation.judge.template")]
    assert len(problems) == 1 and "judge template bomb@" in problems[0] and "range() of 100000" in problems[0]
    assert time.monotonic() - started < 5


# ---- 5. a budget for a stage's requests ----------------------------------------------------------------------
@pytest.mark.fault("trickling judge (stage budget)")
def test_a_stage_budget_bounds_all_requests_and_a_rerun_asks_again(trickling_judge, tmp_path, monkeypatch,  # noqa: F811
                                                                    request):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    base_url, script = trickling_judge
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations(
        {f"p{i}": [f"answer {i} bad", f"answer {i} good"] for i in range(8)}))  # 16 requests
    out = store.stage_uri("r", 0, "annotations")
    cfg = judge_config(base_url, timeout_s=2.0, concurrency=4, budget_s=3.0)
    cfg.annotation.max_failure_fraction = 1.0  # the stage completes with its failures, to show they are not final
    started = time.monotonic()
    manifest = run_annotation(store, generations_uri, out, cfg, {})
    elapsed = time.monotonic() - started
    assert elapsed < 3.0 + 1.5  # without the budget: 4 rounds of 2 s timeouts (8 s)
    sent = script.requests
    assert sent <= 8  # two rounds of 4 in flight; the rest never sent
    assert manifest["extra"]["counts"] == {"error": 8} and manifest["extra"]["transient_failures"] == 8
    assert "annotation.judge.budget_s" in " ".join(store.read_pandas(out)["raw"])

    script.interval_s = 0.0  # the judge recovers: the rerun asks again for every row and completes
    manifest = run_annotation(store, generations_uri, out, cfg, {})
    assert manifest["extra"]["transient_failures"] == 0 and manifest["extra"]["failure_fraction"] == 0.0
    fault_note(request, f"16 requests, budget 3 s: {elapsed:.1f} s, {sent} sent; the rerun answered all 8 rows")


# --- judge templates in a sandbox ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ prompt.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
])
def test_judge_templates_cannot_reach_python_internals(source):
    template = JudgeTemplate(name="evil@0", source=source)
    with pytest.raises(ValueError, match=r"judge template evil@0 tried an unsafe operation, refused by the sandbox"):
        template.render(prompt="p", response_a="a", response_b="b")


def test_bundled_templates_still_render_in_the_sandbox():
    text = load_template("helpfulness").render(prompt="Q?", response_a="first", response_b="second")
    assert "Q?" in text and "first" in text and "second" in text
