"""Secrets never stored: credentials masked in errors, logs and the rows a judge's failure leaves."""

import json
from http.server import BaseHTTPRequestHandler

import pytest

from alignment_core.annotation import HttpJudgeBackend, PairwiseJudgeAnnotator, load_template
from alignment_core.errors import PermanentError
from alignment_core.redact import redact
from tests.test_annotation import make_generations
from tests.test_annotation_http import serving

# --- secrets never stored ------------------------------------------------------------------------------------

FAKE_KEY = "sk-proj-FAKEfake0123456789abcdefXYZ"


@pytest.mark.parametrize(
    "text, secret, kept",
    [
        (f"HTTP 401: invalid api key {FAKE_KEY}", FAKE_KEY[8:], "sk-proj-***"),
        ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "abcdefghij", "Authorization: ***"),
        ("sent Bearer abcdefghijklmnopqrstuvwxyz", "abcdefghij", "Bearer ***"),
        ("hub said hf_abcdefghijklmnopqrstuvwx", "abcdefghijklmnop", "hf_***"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI",
         "aws_secret_access_key=***"),
        ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "secret ***"),
        ("key id AKIAIOSFODNN7EXAMPLE", "ODNN7EXAMPLE", "AKIAIOSF***"),
        ("s3 at https://admin:s3cr3t-pass@minio.local:9000/bucket", "s3cr3t", "https://admin:***@minio.local"),
        ('{"password": "hunter22", "api_key": "abc123"}', "hunter22", '{"password": "***", "api_key": "***"}'),
    ],
)
def test_redact_masks_credentials(text, secret, kept):
    masked = redact(text)
    assert secret not in masked and kept in masked


def test_redact_leaves_ordinary_text_and_json_alone():
    for text in ('{"top_logprobs": [{"token": "A", "logprob": -0.1}], "max_tokens": 8}',
                 "sha 3f786850e387550fdab836ed7e6dc881de23001b", "s3://bucket/runs/tiny/iter-001", "token budget: 512"):
        assert redact(text) == text
    nested = json.dumps({"error": "HTTP 401: " + json.dumps({"message": f"bad key {FAKE_KEY}", "password": "x1"})})
    assert json.loads(json.loads(redact(nested))["error"][len("HTTP 401: "):]) == {
        "message": "bad key sk-proj-***", "password": "***"}


class EchoingServer(BaseHTTPRequestHandler):
    """An endpoint that refuses every request and quotes the key it was sent, as some servers do."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {FAKE_KEY}",
                                     "request_headers": {"Authorization": self.headers.get("Authorization")}}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())


def test_an_http_error_body_quoting_the_key_is_masked_in_the_error(monkeypatch):
    monkeypatch.setenv("HARDENING_TEST_KEY", FAKE_KEY)
    with serving(EchoingServer) as url:
        backend = HttpJudgeBackend(url, "judge-model", api_key_env="HARDENING_TEST_KEY", max_retries=0, timeout_s=5)
        annotator = PairwiseJudgeAnnotator(backend, load_template("helpfulness"))
        with pytest.raises(PermanentError) as refused:  # a 401 stops the stage (alignment_core.errors)
            annotator.annotate(make_generations({"p1": ["good answer", "bad answer"]}))
        backend.close()
    message = str(refused.value)
    assert "401" in message and "Incorrect API key provided: ***" in message and "Bearer" not in message
    assert FAKE_KEY not in message and FAKE_KEY[8:] not in message
