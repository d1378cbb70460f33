"""The configuration reference of the docs, generated from the schema so that it cannot drift from it.

Every field of :class:`spactor_mega.config.Config` becomes one row: its type and default (the
dataclass's), the values it allows and the engines that read it (both stated in the field's comment:
see :mod:`spactor_mega.config`), and its meaning (the comment itself). The docs build renders it
through the MkDocs hook ``docs/hooks.py``; ``python -m spactor_mega.plan.config_reference`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass

from spactor_mega.config import Config, field_comments, leaf_fields
from spactor_mega.plan.engines import ENGINES

# "a | b | c: meaning" -> the allowed values a, b, c (config.py's convention for a field's comment)
_CHOICES = re.compile(r"^\s*([\w.-]+(?:\s*\|\s*[\w.-]+)+)\s*(?::|$)")


@dataclass(frozen=True)
class FieldDoc:
    name: str  # section.field
    type: str
    default: str
    choices: tuple[str, ...]  # empty: any value of the type
    engines: tuple[str, ...]
    meaning: str


def _type_name(annotation: typing.Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and args:
        return " or ".join([_type_name(a) for a in args] + (["None"] if type(None) in typing.get_args(annotation) else []))
    return getattr(annotation, "__name__", str(annotation))


def _value_text(value: typing.Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def choices_of(comment: str) -> tuple[str, ...]:
    """The allowed values a comment starts with (``"a | b | c: ..."``); empty when it lists none."""
    match = _CHOICES.match(comment)
    return tuple(v.strip() for v in match.group(1).split("|")) if match else ()


def _engines(*texts: str) -> tuple[str, ...]:
    only = tuple(name for name in ENGINES if any(f"{name} engine only" in t.lower() for t in texts))
    return only or tuple(ENGINES)


def field_docs() -> list[FieldDoc]:
    """One :class:`FieldDoc` per config field (``section.field``, ``section.sub.field``), in the schema's order."""
    comments = field_comments()
    hints = typing.get_type_hints(Config)
    out = []
    for name, (annotation, default) in leaf_fields().items():
        comment = comments[name]
        section_doc = hints[name.split(".")[0]].__doc__ or ""
        out.append(FieldDoc(
            name=name,
            type=_type_name(annotation),
            default=_value_text(default),
            choices=("true", "false") if annotation is bool else choices_of(comment),
            engines=_engines(comment, section_doc),
            meaning=comment,
        ))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The reference page: a table per config section."""
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    lines = [
        "---",
        "hide: [toc]",  # the tables need the width; the sections are linked below the introduction
        "---",
        "",
        "# Configuration reference",
        "",
        "<!-- generated from spactor_mega/config.py by spactor_mega/plan/config_reference.py at docs build time -->",
        "",
        "Every field of the one typed config (`spactor_mega/config.py`), set in a YAML preset as "
        "`section: {field: value}` or on the command line as `--section.field VALUE` (flags override the "
        "preset). This page is generated from the schema when the site is built: the type and default are "
        "the dataclass's, the meaning is the field's comment in `config.py` (also shown by "
        "`spactor train --help`). `spactor_mega/plan/validate.py` refuses what cannot work, in one line "
        "naming the field ([Bad input](../bad-input.md)): every numeric field refuses 0, -1 and a non-number "
        "unless the value means something (0: off, none, plain T5). A number YAML reads as a string (`1e-3`; "
        "YAML 1.1 wants `1.0e-3`) is parsed as the flag would be. Engines: the values of `train.engine` that read the "
        "field (all: every engine).",
        "",
        "Sections: " + ", ".join(f"[{name}](#{name})" for name in sections) + ".",
        "",
    ]
    docs = field_docs()
    for section in dataclasses.fields(Config):
        doc = (hints[section.name].__doc__ or "").strip()
        lines += [f"## {section.name}", "", f"{doc} Set as `{section.name}.FIELD`.", "",
                  "| field | type | default | allowed values | engines | meaning |",
                  "|---|---|---|---|---|---|"]
        for d in docs:
            if d.name.split(".")[0] != section.name:
                continue
            choices = ", ".join(f"`{c}`" for c in d.choices) or "-"
            engines = "all" if d.engines == tuple(ENGINES) else ", ".join(d.engines)
            lines.append(f"| `{d.name.split('.', 1)[1]}` | {d.type} | `{_cell(d.default)}` | {choices} | {engines} | "
                         f"{_cell(d.meaning)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown())
