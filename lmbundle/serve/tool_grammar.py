"""The grammar of one forced tool call (tool_choice "required" or a named function), built from each tool's
parameters JSON schema, in the format the model's chat template teaches:

- Qwen3.5's (the template shows `<parameter=`): `<tool_call>\\n<function=NAME>\\n`, then each parameter as
  `<parameter=ARG>\\nVALUE\\n</parameter>\\n`, `</function>\\n</tool_call>`. A value the schema makes a string
  is raw text (no quotes; an enum or const as its literals, length and pattern as a regex; it cannot hold
  the format's closing tags); any other value is JSON written as the template's `tojson` writes it, with
  llguidance's JSON-schema grammar (`%json`) for that parameter's schema.
- else Qwen3's: `<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`, the whole object one `%json`.

`strict` (OpenAI's, per function) decides what cannot be enforced: strict, it is refused (GrammarError, a
400 naming the tool and the keyword); not strict, it is left out of the constraint (llguidance's `lenient`)
and the rest is still enforced.
"""

from __future__ import annotations

import json
import re

from ..engine.grammar import Grammar, GrammarError, check_grammar, json_options, lark_grammar
from .tools import schema_kinds

TEMPLATE_SEPARATORS = (", ", ": ")  # json.dumps' defaults: what the chat templates' `tojson` writes
XML_CLOSERS = ("</parameter>\n", "\n</parameter>\n", "</function>\n", "</tool_call>")
# what a raw value cannot hold: the output parser (tools.py) ends the value, the call or the block there
RAW_TEXT = r'/(?s:.*)/ & ~/(?s:.*)(<\/parameter>|<parameter=|<\/function>|<\/tool_call>)(?s:.*)/'
STRING_KEYWORDS = {"type", "enum", "const", "minLength", "maxLength", "pattern", "format", "description", "title",
                   "default", "examples", "$comment", "nullable"}
OBJECT_KEYWORDS = {"type", "properties", "required", "additionalProperties", "description", "title", "$defs",
                   "definitions", "$schema", "$id", "$comment", "default", "examples"}


def uses_xml_calls(chat_template: str) -> bool:
    """Whether the template teaches Qwen3.5's XML tool calls (else Qwen3's JSON ones)."""
    return "<parameter=" in chat_template


def forced_call_grammar(tools: list[dict], xml: bool) -> Grammar:
    """The grammar of exactly one call to one of `tools` (OpenAI tool objects)."""
    if not xml:
        return _json_calls(tools)
    rules, terminals, calls = [], [f"TEXT: {RAW_TEXT}"], []
    for k, tool in enumerate(tools):
        call = _XmlCall(k, tool["function"])
        calls.append(f"call{k}")
        rules += call.rules
        terminals += call.terminals
        try:
            check_grammar(lark_grammar("\n".join([f'start: "<tool_call>\\n" call{k} "</tool_call>"',
                                                  *call.rules, f"TEXT: {RAW_TEXT}", *call.terminals])))
        except GrammarError as exc:
            raise GrammarError(f"tools[{k}] ({call.name}): {str(exc).split(': ', 1)[-1]}") from None
    lark = "\n".join([f'start: "<tool_call>\\n" ({" | ".join(calls)}) "</tool_call>"', *rules, *terminals])
    return Grammar(lark_grammar(lark), XML_CLOSERS)


def _json_calls(tools: list[dict]) -> Grammar:
    """Qwen3's form: one JSON object per call, `arguments` by the tool's schema."""
    shapes = []
    for k, tool in enumerate(tools):
        function = tool["function"]
        shape = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": function["name"]},
                                "arguments": function.get("parameters") or {"type": "object", "properties": {}}}}
        shape = _hoist_defs(shape, function.get("parameters") or {})
        _check_json(shape, bool(function.get("strict")), f"tools[{k}] ({function['name']})")
        shapes.append(shape)
    lenient = not all(tool["function"].get("strict") for tool in tools)
    body = {"anyOf": shapes} if len(shapes) > 1 else shapes[0]
    lark = f'start: "<tool_call>\\n" {_json_rule(body, not lenient)} "\\n</tool_call>"'
    return Grammar(lark_grammar(lark), ("\n</tool_call>",))


def _json_rule(schema: dict, strict: bool) -> str:
    options = json_options(strict, TEMPLATE_SEPARATORS)
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _check_json(schema: dict, strict: bool, where: str) -> None:
    try:
        check_grammar(lark_grammar(f"start: {_json_rule(schema, strict)}"))
    except GrammarError as exc:
        hint = "" if not strict else " (with strict: false it is left out of the constraint)"
        raise GrammarError(f"{where}: {str(exc).split(': ', 1)[-1]}{hint}") from None


def _hoist_defs(shape: dict, parameters: dict) -> dict:
    """`parameters`' $defs / definitions at the top of `shape`, where its "#/$defs/..." refs now point."""
    defs = {key: parameters[key] for key in ("$defs", "definitions") if key in parameters}
    return {**shape, **defs} if defs else shape


class _XmlCall:
    """The rules of one function's call in Qwen3.5's format (`rules`, `terminals`)."""

    def __init__(self, index: int, function: dict):
        self.name, self.index = function["name"], index
        self.strict = bool(function.get("strict"))
        self.parameters = function.get("parameters") or {}
        self.rules: list[str] = []
        self.terminals: list[str] = []
        params = self.parameters
        self._refuse_unknown(params, OBJECT_KEYWORDS, "the parameters object")
        if params.get("type", "object") != "object":
            raise GrammarError(f"{self.where}: parameters must be a JSON schema of type object")
        properties = params.get("properties") or {}
        required = list(params.get("required") or [])
        names = list(properties) + [n for n in required if n not in properties]
        extra = params.get("additionalProperties", True)
        if isinstance(extra, dict) and properties:
            self._refuse("additionalProperties with a schema (Qwen3.5's calls name each parameter)")
        pieces = []
        for j, name in enumerate(names):
            value = self._value(f"p{index}_{j}", properties.get(name, {}), name)
            piece = f'"<parameter={_lark_text(name)}>\\n" {value}'
            pieces.append(piece if name in required else f"({piece})?")
        if not properties and extra is not False:  # a free-form object: any parameters, raw values
            self.terminals.append(f"NAME{index}: /[A-Za-z_][A-Za-z0-9_.-]*/")
            self.terminals.append(f'V{index}_ANY: TEXT "\\n</parameter>\\n"')
            pieces.append(f'("<parameter=" NAME{index} ">\\n" V{index}_ANY)*')
        self.rules.append(f'call{index}: "<function={_lark_text(self.name)}>\\n" {" ".join(pieces)} "</function>\\n"')

    @property
    def where(self) -> str:
        return f"tools[{self.index}] ({self.name})"

    def _refuse(self, what: str) -> None:
        if self.strict:
            raise GrammarError(f"{self.where}: {what} cannot be enforced; send strict: false to leave it out "
                               "of the constraint")

    def _refuse_unknown(self, schema: dict, known: set[str], where: str) -> None:
        unknown = sorted(set(schema) - known)
        if unknown:
            self._refuse(f"{', '.join(unknown)} in {where}")

    def _value(self, rule: str, schema: dict, name: str) -> str:
        """The grammar of a parameter's value and the tag that ends it."""
        schema = self._resolved(schema)
        kinds = schema_kinds(schema, self.parameters)
        if kinds is not None and "string" not in kinds:
            return self._json_value(rule, schema, name)
        if kinds is None or kinds == {"string"} or kinds == {"string", "null"}:
            terminal = rule.upper()
            raw = self._raw_string(schema, name) if kinds is not None else "TEXT"
            if kinds == {"string", "null"}:
                self.terminals.append(f'{terminal}: ({raw} & ~/null/) "\\n</parameter>\\n"')
                return f'({terminal} | "null\\n</parameter>\\n")'
            self.terminals.append(f'{terminal}: {raw} "\\n</parameter>\\n"')
            return terminal
        self._refuse(f"parameter {name!r} takes a string or other types (a raw value cannot tell them apart)")
        terminal = rule.upper()
        self.terminals.append(f'{terminal}: TEXT "\\n</parameter>\\n"')
        return f"({terminal} | {self._json_value(rule, schema, name)})"

    def _json_value(self, rule: str, schema: dict, name: str) -> str:
        shape = _hoist_defs(schema, self.parameters)
        _check_json(shape, self.strict, f"{self.where} parameter {name!r}")
        self.rules.append(f"{rule}: {_json_rule(shape, self.strict)}")
        return f'{rule} "\\n</parameter>\\n"'

    def _raw_string(self, schema: dict, name: str) -> str:
        """A raw string value as a regex term: its enum / const literals, else TEXT within its length and
        pattern."""
        self._refuse_unknown(schema, STRING_KEYWORDS | {"anyOf", "oneOf"}, f"parameter {name!r}")
        literals = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if literals is not None:
            strings = [v for v in literals if isinstance(v, str)]
            if not strings:
                raise GrammarError(f"{self.where}: parameter {name!r}: no string among its enum values")
            return "(" + " | ".join(json.dumps(v, ensure_ascii=False) for v in strings) + ")"
        term = "TEXT"
        low, high = schema.get("minLength"), schema.get("maxLength")
        if low is not None or high is not None:
            term += f" & /(?s:.){{{int(low or 0)},{'' if high is None else int(high)}}}/"
        if "pattern" in schema:
            term += f" & {_search_regex(schema['pattern'])}"
        if "format" in schema:
            self._refuse(f"format {schema['format']!r} of parameter {name!r} (a raw value)")
        return f"({term})"

    def _resolved(self, schema: dict) -> dict:
        """A parameter's schema with a local $ref ("#/$defs/X", "#/definitions/X") followed."""
        for _ in range(8):
            ref = schema.get("$ref") if isinstance(schema, dict) else None
            if not isinstance(ref, str):
                return schema
            match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
            target = match and (self.parameters.get(match.group(1)) or {}).get(match.group(2))
            if not isinstance(target, dict):
                raise GrammarError(f"{self.where}: unresolvable $ref {ref!r}")
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema


def _search_regex(pattern: str) -> str:
    """JSON schema's `pattern` (found anywhere in the string unless anchored) as a Lark regex of the whole."""
    from llguidance import regex_to_lark

    start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1 if start else 0: len(pattern) - 1 if end else len(pattern)]
    regex = ("" if start else "(?s:.*)") + f"(?:{regex_to_lark(body, 'dw')})" + ("" if end else "(?s:.*)")
    return f"/{regex}/"


def _lark_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]
