"""Input hardening and security: unreadable rows are counted skips, configs fail at load (duplicate keys, inf/nan,
cross-field rules), scored lists in public spellings, sandboxed judge templates, redacted secrets, an allow-list
for config-named code."""

import json
import math
import typing
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from alignment_core import pipeline
from alignment_core.annotation import HttpJudgeBackend, PairwiseJudgeAnnotator, load_template
from alignment_core.annotation.judge import JudgeTemplate
from alignment_core.annotation.scorers import ALLOWED_CODE_ENV, import_callable
from alignment_core.config import ConfigError, PipelineConfig, load_config, parse_config, yaml_load_unique
from alignment_core.data import DatasetLoader, detect_format
from alignment_core.errors import PermanentError
from alignment_core.redact import redact
from alignment_core.rewards import positive_words
from alignment_core.store import ArtifactStore
from tests.test_annotation import make_generations
from tests.test_annotation_http import serving

REPO = Path(__file__).resolve().parent.parent


def load(path, **options):
    loader = DatasetLoader(str(path), **options)
    return loader.load().to_pylist(), loader.report


# --- rows that are not UTF-8 text: counted skips with their line ---------------------------------------------


def test_non_utf8_and_unencodable_jsonl_rows_are_counted_with_their_line(tmp_path, caplog):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(
        b'{"prompt": "first"}\n'
        b"\n"
        b'{"prompt": "caf\xe9 latin-1"}\n'  # line 3: a Latin-1 byte, not UTF-8
        b'{"prompt": "second"}\n'
        b'{"prompt": "lone \\ud800 surrogate"}\n'  # line 5: valid JSON, but no UTF-8 encoding exists
        b'{"prompt": "third \\ud83d\\ude00"}\n'  # a proper surrogate pair: an emoji, kept
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["first", "second", "third \U0001f600"]
    assert report.skipped_by_reason == {"invalid_encoding": 2} and report.rows_read == 5
    assert report.first_bad_detail.startswith("line 3: not valid UTF-8 (byte 0xe9")
    assert "line 3" in caplog.text
    assert report.first_bad_row_by_reason == {"invalid_encoding": 1}  # the source row index (line 2 is blank)
    with pytest.raises(ValueError, match=r"row 1 \(prompt_only format\): line 3: not valid UTF-8"):
        DatasetLoader(str(path), on_bad_row="fail").load()
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_bytes(b'{"prompt": "ok"}\n{"prompt": "ok too", "meta": {"note": "\\udc80"}}\n')
    with pytest.raises(ValueError, match=r"line 2: 'meta.note' is not valid UTF-8 text"):
        DatasetLoader(str(surrogate), on_bad_row="fail").load()


def test_non_utf8_json_array_item_is_counted_with_its_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(
        b'[\n  {"prompt": "a", "chosen": "x", "rejected": "y"},\n'
        b'  {"prompt": "b\xff", "chosen": "x", "rejected": "y"},\n'
        b'  {"prompt": "c", "chosen": "x", "rejected": "y"}\n]\n'
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["a", "c"]
    assert report.skipped_by_reason == {"invalid_encoding": 1}
    assert report.first_bad_detail.startswith("item 1 (line 3): 'prompt' is not valid UTF-8")


def test_non_utf8_csv_row_is_counted_and_the_column_still_loads_as_text(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(
        b'prompt,chosen,rejected\n'
        b'"a prompt\nover two lines",good,bad\n'
        b'caf\xe9,good,bad\n'  # line 4: not UTF-8
        b'plain,good,bad\n'
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["a prompt\nover two lines", "plain"]  # text, not bytes
    assert report.skipped_by_reason == {"invalid_encoding": 1}
    assert report.first_bad_detail == "line 4: column 'prompt' is not valid UTF-8 text"


def test_load_reports_reach_the_prompts_and_examples_manifests(tmp_path):
    source = tmp_path / "pairs.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "chosen": "great", "rejected": "bad"}).encode() for i in range(6)]
    source.write_bytes(b"\n".join(good[:3] + [b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}'] + good[3:]))
    data = {"source": str(source), "eval_prompts": 2}
    store = {"root": str(tmp_path / "runs"), "run_name": "r"}
    online = parse_config({"data": data, "store": store, "generation": {"prompts_per_iteration": 2}})
    offline = parse_config({"setup": "offline_pairwise", "data": data, "store": store})
    uris = [pipeline.load_prompts(online, 1), pipeline.load_eval_prompts(online), pipeline.load_examples(offline)]
    manifests = [ArtifactStore(str(tmp_path / "runs")).read_manifest(uri) for uri in uris]
    for manifest in manifests:
        report = manifest["extra"]["report"]
        assert report["skipped_by_reason"] == {"invalid_encoding": 1} and report["rows_kept"] == 6
        assert report["first_bad_detail"].startswith("line 4: not valid UTF-8")


# --- YAML: duplicate keys --------------------------------------------------------------------------------------


def test_duplicate_yaml_keys_fail_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  beta: 0.1\n  loss: dpo\n  beta: 0.5\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'beta' \(first at line 2\)[\s\S]*line 4"):
        load_config(path)
    path.write_text("training: {beta: 0.1}\ntraining: {beta: 0.2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'training'"):
        load_config(path)
    # The same key in two mappings is no duplicate; a merge key's values may be overridden (as
    # deployments/prefect.yaml does).
    path.write_text("training: {seed: 1}\ngeneration: {seed: 1}\n")
    assert load_config(path).generation.seed == 1
    text = "base: &base {beta: 0.1, loss: dpo}\ncfg:\n  training:\n    <<: *base\n    beta: 0.3\n"
    assert yaml_load_unique(text)["cfg"]["training"] == {"beta": 0.3, "loss": "dpo"}


# --- inf / nan ------------------------------------------------------------------------------------------------


def _float_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Dotted paths of every float field of a config model, through its nested sections."""
    paths = []
    for name, info in model.model_fields.items():
        candidates = [info.annotation, *typing.get_args(info.annotation)]
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for section in sections:
            paths += _float_fields(section, (*prefix, name))
        if float in candidates:
            paths.append((*prefix, name))
    return paths


FLOAT_FIELDS = _float_fields(PipelineConfig)


def _json_schema_numbers(node: dict, definitions: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """The same paths read from the JSON schema (what the UI's form shows): properties of type number."""
    paths = []
    for name, prop in node.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        for option in options:
            ref = option.get("$ref") or (option.get("allOf") or [{}])[0].get("$ref")
            if ref:
                paths += _json_schema_numbers(definitions[ref.rsplit("/", 1)[-1]], definitions, (*prefix, name))
        if any(option.get("type") == "number" for option in options):
            paths.append((*prefix, name))
    return paths


def test_the_walk_finds_every_number_of_the_schema():
    schema = PipelineConfig.model_json_schema()
    assert set(FLOAT_FIELDS) == set(_json_schema_numbers(schema, schema["$defs"]))
    assert {("training", "beta"), ("reweight", "clip"), ("annotation", "pointwise_threshold"),
            ("model", "adapter", "alpha"), ("store", "lease_timeout_s")} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", FLOAT_FIELDS, ids=".".join)
def test_no_float_field_accepts_inf_or_nan(path, value):
    data: dict = {}
    section = data
    for name in path[:-1]:
        section = section.setdefault(name, {})
    section[path[-1]] = value
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert f"{'.'.join(path)}: Input should be a finite number" in str(error.value)


def test_yaml_inf_and_nan_fail_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: {beta: .inf}\nreweight: {temperature: .nan}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert {"training.beta: Input should be a finite number, got inf",
            "reweight.temperature: Input should be a finite number, got nan"} <= set(str(error.value).splitlines())


# --- cross-field rules at config load -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"reweight": {"clip": 0.5}}, "reweight.clip: clip must be >= 1 (weights are clipped to [1/clip, clip])"),
        ({"generation": {"n_samples": 1}}, "generation.n_samples must be >= 2 for setup 'online_pairwise'"),
        ({"setup": "rl", "training": {"loss": "rl"}, "generation": {"n_samples": 1}},
         "generation.n_samples must be >= 2 for setup 'rl' (rl's leave-one-out baseline"),
        ({"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1}},
         "pointwise labels by the per-prompt median need two samples"),
        ({"generation": {"max_new_tokens": 512, "max_model_len": 512}},
         "generation.max_new_tokens (512) must be < generation.max_model_len (512)"),
        ({"evaluation": {"max_new_tokens": 600}}, "evaluation.max_new_tokens (600) must be < generation.max_model_len"),
        ({"training": {"max_prompt_length": 300, "max_length": 256}}, "max_prompt_length (300) must be < max_length"),
        ({"setup": "rl", "training": {"loss": "rl"}, "annotation": {"annotator": "judge_pairwise",
                                                                    "judge": {"model": "m"}}},
         "annotation.annotator 'judge_pairwise' gives preference pairs, but setup 'rl' needs rewards"),
        ({"setup": "online_pointwise", "training": {"loss": "kto", "batch_size": 1},
          "annotation": {"pointwise_threshold": 0.5}}, "loss 'kto' needs batch_size >= 2"),
        ({"data": {"source": "bundled:prompts", "split": "test"}},
         "data source 'bundled:prompts' is a single file: split/subset/revision apply only to hub datasets"),
        ({"data": {"source": "org/dataset", "split": "train_prefs", "eval_source": "held_out.jsonl"}},
         "data source 'held_out.jsonl' is a single file"),
        ({"setup": "offline_pairwise", "data": {"format": "prompt_only"}},
         "data.format 'prompt_only' gives no examples setup 'offline_pairwise' can train on"),
        ({"setup": "offline_pointwise", "training": {"loss": "kto"}, "data": {"format": "pairs"}},
         "data.format 'pairs' gives no examples setup 'offline_pointwise' can train on"),
    ],
)
def test_cross_field_rules_fail_at_config_load(data, message):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "data",
    [
        {"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1},
         "annotation": {"pointwise_threshold": 0.5}},
        {"setup": "online_pointwise", "training": {"loss": "kto"}, "generation": {"n_samples": 1},
         "annotation": {"annotator": "judge_pointwise", "judge": {"model": "m"}}},  # yes/no: threshold 0.5
        {"evaluation": {"enabled": False, "max_new_tokens": 600}},
        {"setup": "offline_pairwise", "generation": {"n_samples": 1}},  # offline: no sampling of pairs
        {"setup": "sft", "training": {"loss": "sft"}, "data": {"format": "pairs"}},
        {"data": {"source": "org/dataset", "split": "train_prefs", "eval_source": "org/held_out"}},
        {"setup": "offline_pairwise", "annotation": {"annotator": "judge_pairwise", "judge": {"model": "m"}}},
    ],
)
def test_cross_field_rules_accept_what_works(data):
    assert isinstance(parse_config(data), PipelineConfig)


def test_the_late_checks_share_the_config_rules():
    from alignment_core.batches import BatchFactory
    from alignment_core.config import ReweightConfig
    from alignment_core.reweight import SampleReweighter

    unvalidated = ReweightConfig().model_copy(update={"clip": 0.5})  # model_copy skips validation
    with pytest.raises(ValueError, match=r"clip must be >= 1 \(weights are clipped"):
        SampleReweighter(unvalidated)
    with pytest.raises(ValueError, match=r"max_prompt_length \(64\) must be < max_length \(64\)"):
        BatchFactory(object(), "sft", max_length=64, max_prompt_length=64)


# --- scored lists in public spellings; no silent prompt_only ------------------------------------------------


def test_scored_lists_in_other_spellings(tmp_path):
    rows = [
        {"prompt": "Pick", "completions": ["meh", "great", "bad"], "rewards": [0.2, 0.9, 0.1]},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Chat"}],
         "completions": [[{"role": "assistant", "content": "hello friend"}], [{"role": "assistant", "content": "go"}]],
         "rewards": [2, 1]},
        {"prompt": "Bad", "completions": ["a", "b"], "rewards": [1.0, "high"]},
    ]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept, report = load(path)
    assert report.format == "scored"
    assert [(row["chosen"], row["rejected"]) for row in kept] == [("great", "bad"), ("hello friend", "go")]
    assert kept[1]["prompt_messages"][0] == {"role": "system", "content": "Be kind."}
    assert report.skipped_by_reason == {"invalid_score": 1}
    assert "rewards[1]" in report.first_bad_detail
    for responses, scores in (("responses", "ratings"), ("outputs", "scores"), ("candidates", "rewards")):
        assert detect_format([{"prompt": "p", responses: ["a", "b"], scores: [1, 2]}]) == "scored"


@pytest.mark.parametrize(
    "row, unread",
    [
        ({"prompt": "p", "response": "r", "reward": 1.0}, "['response', 'reward']"),
        ({"prompt": "p", "completions": ["a", "b"]}, "['completions']"),  # scores missing
        ({"prompt": "p", "output": "o", "id": 3}, "['output']"),
        ({"messages": [{"role": "user", "content": "q"}], "answer": "a"}, "['answer']"),
    ],
)
def test_unread_columns_are_an_error_not_a_prompt_only_load(tmp_path, row, unread):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError) as error:
        DatasetLoader(str(path)).load()
    message = str(error.value)
    assert f"columns {unread} would not be read" in message
    assert "scored: prompt, responses/completions" in message and "pairs: prompt, chosen, rejected" in message
    kept, report = load(path, format="prompt_only")  # named explicitly: the prompts alone
    assert report.format == "prompt_only" and len(kept) == 1


def test_prompt_only_beside_metadata_columns_is_detected():
    assert detect_format([{"prompt": "p", "id": 1, "source": "web", "category": "chat", "lang": "en"}]) == "prompt_only"


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


# --- the allow-list for config-named code ---------------------------------------------------------------------


def test_without_the_allow_list_any_module_is_importable(monkeypatch):
    monkeypatch.setenv(ALLOWED_CODE_ENV, "recorded")
    monkeypatch.delenv(ALLOWED_CODE_ENV)
    assert import_callable("json:dumps") is json.dumps


def test_the_allow_list_refuses_other_modules_before_importing_them(monkeypatch, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "hardening_payload.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef reward(prompt, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ALLOWED_CODE_ENV, "alignment_core.")
    assert import_callable("alignment_core.rewards:positive_words") is positive_words
    with pytest.raises(ValueError, match=r"module 'hardening_payload' is not allowed here: ALIGNMENT_CORE_ALLOWED_"
                                         r"CODE allows only modules under \['alignment_core.'\]"):
        import_callable("hardening_payload:reward")
    assert not marker.exists()  # refused before its code ran
    # Not through an allowed module to something it imported.
    with pytest.raises(ValueError, match=r"'re.compile' is defined elsewhere.*module 're' is not allowed"):
        import_callable("alignment_core.rewards:re.compile")
    with pytest.raises(ValueError, match="not allowed"):  # the same rule for evaluation.oracle
        from alignment_core.evaluation import load_callable

        load_callable("os:system")
    for setting in ("alignment_core., hardening_payload", "*"):
        monkeypatch.setenv(ALLOWED_CODE_ENV, setting)
        assert import_callable("hardening_payload:reward")("p", "r") == 1.0
    monkeypatch.setenv(ALLOWED_CODE_ENV, "hardening")  # a prefix is a whole module name, not its first letters
    with pytest.raises(ValueError, match="not allowed"):
        import_callable("hardening_payload:reward")


def test_deployments_set_the_allow_list(monkeypatch):
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for deployment in document["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]  # a pool's job variables: `prefect deploy` reads them
        assert env[ALLOWED_CODE_ENV] == "alignment_core.", deployment["name"]
    import flows.serve

    for setting in flows.serve.ALLOW_LISTS:  # so that monkeypatch unsets what main() sets
        monkeypatch.setenv(setting, "recorded")
        monkeypatch.delenv(setting)
    served = []
    monkeypatch.setattr(flows.serve, "serve", lambda *deployments: served.extend(deployments))
    monkeypatch.setattr(flows.serve, "deployments", lambda *options: ["d"])
    flows.serve.main([])
    import os

    assert served == ["d"] and os.environ[ALLOWED_CODE_ENV] == "alignment_core."


def test_no_test_leaves_the_allow_list_set():
    import os

    assert ALLOWED_CODE_ENV not in os.environ
