"""Write docs/configuration.md, the configuration reference, from the pydantic models of alignment_core/config/.

Every field's docstring is its description (the same text the Prefect UI's form shows), so the page is generated,
never edited by hand: `python scripts/config_reference.py` rewrites it, `--check` exits 1 when it is out of date
(tests/test_docs.py runs the check).
"""

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from alignment_core.config import PipelineConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEADER = """# Configuration reference

Generated from `alignment_core/config/` by `scripts/config_reference.py`; do not edit by hand (rerun the
script after changing a field: tests/test_docs.py fails while this page is out of date). A config is YAML; a
field left out takes the default below. `--set section.field=value` on the command line and the Prefect UI's
form (a deployment's `config` parameter) set the same fields, with the same descriptions.
"""


def type_name(annotation) -> str:
    """The annotation as a reader writes it in YAML terms: Literal values as a choice, None as null."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return annotation.__name__


def bounds(metadata: list) -> str:
    """The field's numeric constraints (pydantic's annotated_types: Gt, Ge, Lt, Le) as `> 0, <= 1`."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return ", ".join(f"{sign} {getattr(item, name)}" for item in metadata for name, sign in signs.items()
                     if hasattr(item, name))


def default_text(info) -> str:
    """The default as YAML reads it (JSON's spelling: true, null, [] are YAML too)."""
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined:
        return "required"
    return f"`{json.dumps(value)}`"


def section_model(annotation) -> type[BaseModel] | None:
    """The model a field nests (`adapter: AdapterConfig | None` nests AdapterConfig), else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((arg for arg in candidates if isinstance(arg, type) and issubclass(arg, BaseModel)), None)


def one_line(text: str | None) -> str:
    """A description in one table cell: one line, its pipes escaped, angle brackets shown (not read as HTML)."""
    return " ".join((text or "").split()).replace("|", "\\|").replace("<", "&lt;")


def sections(model: type[BaseModel], prefix: str = "") -> list[str]:
    """A table of the model's own fields, then one section per nested model, depth first."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        sub = section_model(info.annotation)
        if sub is not None:
            nested.append((f"{prefix}{name}", sub, info.description))
            continue
        limits = bounds(info.metadata)
        rows.append(f"| `{name}` | {type_name(info.annotation)}{f' ({limits})' if limits else ''} | "
                    f"{default_text(info)} | {one_line(info.description)} |")
    lines = []
    if rows:
        lines += ["| field | type | default | description |", "|---|---|---|---|", *rows, ""]
    for path, sub, description in nested:
        lines += [f"{'#' * min(2 + path.count('.'), 4)} `{path}`", ""]
        summary = one_line(description or sub.__doc__)
        if summary:
            lines += [summary, ""]
        lines += sections(sub, f"{path}.")
    return lines


def render() -> str:
    return "\n".join([HEADER, "## Top level", "", *sections(PipelineConfig)]).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args()
    page = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
