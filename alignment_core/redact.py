"""Mask secrets in text that is stored or logged: `redact(text)`.

Error text from HTTP endpoints, tracebacks and URIs can carry credentials (a server echoing the request's
`Authorization` header, a key in a query string, `https://user:pass@host`). What this masks:

    Authorization: Bearer abc...      ->  Authorization: ***
    Bearer abc...                     ->  Bearer ***
    sk-..., sk-proj-..., hf_..., ghp_..., xox?-..., AKIA... (access key ids)  ->  *** (keeps the prefix)
    aws_secret_access_key=... / "AWS_SECRET_ACCESS_KEY": "..."  ->  the value masked
    api_key=..., token=..., password=... (query strings, key=value, JSON "key": "value")  ->  the value masked
    scheme://user:password@host       ->  scheme://user:***@host

Masks never span a quote or a line, so masked JSON stays valid JSON. It is a net for accidents, not a reason
to put secrets into text: credentials belong in the environment (README: Trust model).
"""

import re

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


def redact(text: str) -> str:
    """`text` with credentials masked (see the module docstring); other text unchanged."""
    if not text:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
