"""Mask secrets in text that is stored or logged: `redact(text)`.

Error text from HTTP endpoints, tracebacks and URIs can carry credentials (a server echoing the request's
`Authorization` header, a key in a query string, `https://user:pass@host`). What this masks:

    Authorization: Bearer abc...      ->  Authorization: ***
    Bearer abc...                     ->  Bearer ***
    sk-..., sk-proj-..., hf_..., ghp_..., xox?-..., AKIA... (access key ids)  ->  *** (keeps the prefix)
    aws_secret_access_key=... / "AWS_SECRET_ACCESS_KEY": "..."  ->  the value masked
    api_key=..., token=..., password=... (query strings, key=value, JSON "key": "value")  ->  the value masked
    scheme://user:password@host       ->  scheme://user:***@host

Masks never span a quote or a line, so masked JSON stays valid JSON.

Shapes miss keys that have none (a provider's plain 32-character key, a password). So every secret this process
was given is also masked by its value, wherever it appears, whatever surrounds it:

    the environment variables named in SECRET_ENVS (HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, ...) and in
    $ALIGNMENT_CORE_ALLOWED_SECRETS, any whose name is secret-shaped (..._KEY, ..._TOKEN, ..._SECRET, ...),
    those a config names (`remember_secret_env`: annotation.judge.api_key_env), and the passwords of URLs in
    the config (`remember_secrets_in`)

Values shorter than MIN_SECRET_LENGTH are left alone (masking every "1" would garble all text).
`install_log_redaction()` applies `redact` to every log record of the process (console, files, Prefect's API).

It is a net for accidents, not a reason to put secrets into text: credentials belong in the environment
(docs/trust-model.md).
"""

import json
import logging
import os
import re
from urllib.parse import quote, urlsplit

MASK = "***"

_Q = r"(?:\\?[\"'])"  # a quote, maybe backslash-escaped (JSON inside a JSON string)
_PATTERNS: list[tuple[re.Pattern, str]] = [
    # Authorization / Proxy-Authorization headers, whatever the scheme (Bearer, Basic, token, ...).
    (re.compile(rf"(?i)\b((?:proxy-)?authorization{_Q}?\s*[:=]\s*{_Q}?)[^\"'\r\n,}}\\]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1{MASK}"),
    # Credentials in URLs: scheme://user:password@host (the user name stays, for debugging).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"'\\]*:)[^/\s@\"'\\]+@"), rf"\1{MASK}@"),
    # Well-known key shapes: OpenAI/Anthropic (sk-...), Hugging Face (hf_...), GitHub, Slack, AWS key ids.
    (re.compile(r"\b(sk-(?:ant-|proj-)?)[A-Za-z0-9_-]{16,}"), rf"\1{MASK}"),
    (re.compile(r"\b(hf_)[A-Za-z0-9]{16,}"), rf"\1{MASK}"),
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{20,}"), rf"\1{MASK}"),
    (re.compile(r"\b(xox[abprs]-)[A-Za-z0-9-]{10,}"), rf"\1{MASK}"),
    (re.compile(r"\b((?:AKIA|ASIA)[A-Z0-9]{4})[A-Z0-9]{12}\b"), rf"\1{MASK}"),
    # Secret-named values: key=value, key: value, "key": "value" (AWS secret keys, api keys, tokens, passwords).
    # A bare `token` is not one (completion APIs return {"token": "A", "logprob": ...}).
    (re.compile(rf"(?i)({_Q}?\b[a-z0-9_-]*(?:secret|password|passwd|api[_-]?key|access[_-]?key|"
                rf"(?:access|auth|api|refresh|session|id|private)[_-]?token)[a-z0-9_-]*{_Q}?\s*[:=]\s*{_Q}?)"
                r"(?![\"'\s\\])[^\"'\s&,;}\\]+"), rf"\1{MASK}"),
    # A bare 40-character AWS secret access key (base64 alphabet, mixed case, with a digit or / or +).
    (re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[0-9/+])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
                r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"), MASK),
]


# Where a process is given secrets besides the config-named ones (README: Object storage, Experiment tracking).
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "OPENAI_API_KEY", "PREFECT_API_KEY")
ALLOWED_SECRETS_ENV = "ALIGNMENT_CORE_ALLOWED_SECRETS"  # the env var names a config may name as secrets
# An environment variable named like a credential: a word KEY, TOKEN, SECRET, PASSWORD, PASSWD or CREDENTIALS.
_SECRET_NAME = re.compile(r"(?i)(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:_|$)")
MIN_SECRET_LENGTH = 8

_remembered_envs: set[str] = set()
_remembered_values: set[str] = set()


def remember_secret_env(name: str) -> None:
    """Mask the value of environment variable `name` from now on (a config named it as a secret)."""
    _remembered_envs.add(name)


def remember_secrets_in(text: str) -> None:
    """Mask from now on the passwords of the URLs in `text` (a config's URIs: `s3://user:password@host`)."""
    for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"']+", text, flags=re.IGNORECASE):
        try:
            password = urlsplit(url).password
        except ValueError:  # not a URL after all (a bad port)
            continue
        if password:
            _remembered_values.add(password)


def secret_values() -> set[str]:
    """Every secret value this process holds now, each at least MIN_SECRET_LENGTH characters long."""
    names = {*SECRET_ENVS, *_remembered_envs,
             *(name.strip() for name in os.environ.get(ALLOWED_SECRETS_ENV, "").split(","))}
    names |= {name for name in os.environ if _SECRET_NAME.search(name)}
    values = {os.environ.get(name) or "" for name in names} | _remembered_values
    values = {value for value in values if len(value) >= MIN_SECRET_LENGTH}
    # As they appear in a URL's query or inside a JSON string too (an AWS secret's "/" and "+" are escaped in
    # a URL, a password's quotes and backslashes in JSON).
    return values | {quote(value, safe="") for value in values} | {json.dumps(value)[1:-1] for value in values}


def redact(text: str) -> str:
    """`text` with credentials masked (see the module docstring); other text unchanged."""
    if not text:
        return text
    # Longest first: a secret that contains another is masked whole.
    for value in sorted(secret_values(), key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def install_log_redaction() -> None:
    """Mask secrets in every log record this process creates from now on, with its traceback: whatever handler
    gets it (console, file, Prefect's API log handler) sees the masked text. Installing twice is harmless."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacting_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    redacting_record.redacts = True
    logging.setLogRecordFactory(redacting_record)
