"""The reasoning / tool-call parser on hand-written Qwen3.5 outputs: well-formed, malformed, and split
across stream chunks at every position (the split result must equal the whole-text result)."""

from __future__ import annotations

import json

import pytest

from lmbundle.serve.tools import OutputParser, convert_value

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread for tiny models

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "where": {"type": "object"}},
    "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
        "<parameter=where>\n{\"lat\": 1.5}\n</parameter>\n</function>\n</tool_call>")
ARGS = {"city": "San Francisco, CA", "days": 3, "metric": True, "where": {"lat": 1.5}}


def run(text: str, thinking: bool, tools=TOOLS, pieces: list[str] | None = None, stopped: bool = True) -> dict:
    """The parser's output put together: content, reasoning, tool calls (name, arguments)."""
    parser = OutputParser(thinking, tools)
    deltas = []
    for piece in pieces if pieces is not None else [text]:
        deltas += parser.push(piece)
    deltas += parser.finish(stopped)
    out = {"content": "", "reasoning": "", "calls": [], "moved": None}
    for d in deltas:
        if "tool_call" in d:
            fn = d["tool_call"]["function"]
            assert d["tool_call"]["type"] == "function" and d["tool_call"]["id"].startswith("call_")
            out["calls"].append((fn["name"], json.loads(fn["arguments"])))
        elif d.get("moved_from_reasoning"):
            out["moved"] = d["content"]
        elif "reasoning_content" in d:
            out["reasoning"] += d["reasoning_content"]
        else:
            out["content"] += d["content"]
    return out


CASES = [
    # (model output, prompt opens <think>, expected content, reasoning, calls)
    ("Let me think.\n</think>\n\nIt is sunny.", True, "It is sunny.", "Let me think.\n", []),
    ("Checking.\n</think>\n\n" + CALL, True, "", "Checking.\n", [("get_weather", ARGS)]),
    ("Sure.\n\n" + CALL + "\n" + CALL.replace("San Francisco, CA", "Paris"), False, "Sure.", "",
     [("get_weather", ARGS), ("get_weather", dict(ARGS, city="Paris"))]),
    # a tool call inside the reasoning is a call, not lost (vLLM #39056)
    ("I should call it.\n" + CALL + "\n</think>\n\nDone.", True, "Done.", "I should call it.\n",
     [("get_weather", ARGS)]),
    # </think> omitted before the call (seen when tools are present)
    ("I will look it up.\n\n" + CALL, True, "", "I will look it up.\n\n", [("get_weather", ARGS)]),
    # Qwen3 / Qwen3-VL JSON inside <tool_call>
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', False, "", "",
     [("get_weather", {"city": "Oslo"})]),
    # the model opens <think> itself (Qwen3 style)
    ("<think>\nhmm\n</think>\n\nAnswer.", False, "Answer.", "hmm\n", []),
    # <think> later in the content is plain text
    ("Use <think> tags.", False, "Use <think> tags.", "", []),
    # a call to a tool that was not declared stays text
    ("<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", False,
     "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", "", []),
    # malformed JSON in a block stays text
    ('<tool_call>\n{"name": "get_weather", "arguments": {bad}\n</tool_call> ok', False,
     '<tool_call>\n{"name": "get_weather", "arguments": {bad}\n</tool_call> ok', "", []),
    # an unclosed block at the end that reads as a call (small models stop before </tool_call>)
    ("<tool_call>\n<function=noop>\n</function>", False, "", "", [("noop", {})]),
    # an unclosed block that does not read as a call
    ("<tool_call>\nnot a call", False, "<tool_call>\nnot a call", "", []),
    # a parameter without its closing tag, then the next one
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n<parameter=days>\n2\n</function>\n</tool_call>",
     False, "", "", [("get_weather", {"city": "Rome", "days": 2})]),
]


@pytest.mark.parametrize("text, thinking, content, reasoning, calls", CASES)
def test_parser_whole_and_split_at_every_position(text, thinking, content, reasoning, calls):
    whole = run(text, thinking)
    assert (whole["content"], whole["reasoning"], whole["calls"]) == (content, reasoning, calls)
    for cut in range(1, len(text)):
        assert run(text, thinking, pieces=[text[:cut], text[cut:]]) == whole, cut
    assert run(text, thinking, pieces=list(text)) == whole  # one character per chunk


def test_without_tools_tool_call_text_is_content():
    out = run(CALL, False, tools=None)
    assert out["content"] == CALL and out["calls"] == []


def test_reply_that_never_leaves_thinking():
    """Stopped at EOS still "thinking": the text is the answer (never content null); cut by the length
    limit it stays reasoning."""
    out = run("Paris is the capital.", True)
    assert out["moved"] == "Paris is the capital." and out["reasoning"] == "Paris is the capital."
    out = run("Paris is the capital.", True, stopped=False)
    assert out["moved"] is None and out["reasoning"] == "Paris is the capital." and out["content"] == ""


def test_convert_value_follows_the_schema():
    assert convert_value("007", {"type": "string"}) == "007"
    assert convert_value("7", {"type": "integer"}) == 7
    assert convert_value("2.5", {"type": "number"}) == 2.5
    assert convert_value("False", {"type": "boolean"}) is False
    assert convert_value("[1, 2]", {"type": "array"}) == [1, 2]
    assert convert_value("not json", {"type": "object"}) == "not json"
    assert convert_value("null", {"type": ["string", "null"]}) is None
    assert convert_value("hello", {}) == "hello"


def test_a_raw_value_becomes_json_only_of_a_kind_its_schema_takes():
    assert convert_value("12", {"type": ["string", "null"]}) == "12"  # was 12, an integer the schema refuses
    assert convert_value("true", {"anyOf": [{"type": "string"}, {"type": "null"}]}) == "true"
    assert convert_value("null", {"anyOf": [{"type": "string"}, {"type": "null"}]}) is None
    assert convert_value("3", {"$ref": "#/$defs/n"}, {"$defs": {"n": {"type": "number"}}}) == 3
    assert convert_value("[1]", {"$ref": "#/$defs/s"}, {"$defs": {"s": {"type": "string"}}}) == "[1]"
    assert convert_value("2", {"enum": [1, 2, "x"]}) == 2 and convert_value("x", {"enum": [1, 2, "x"]}) == "x"


# -- the forced call's grammar, on the trained demo model ---------------------------------------------------
# (tool_choice "required" or a named function: tool_grammar.py; before, 0/100 calls were valid against their
# schema for tools like these: enums unenforced, objects and arrays written as strings)
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "required": ["city", "unit"],
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {"name": "schedule", "parameters": {
        "type": "object", "required": ["when", "who"],
        "properties": {"when": {"type": "object", "required": ["day", "hour"], "additionalProperties": False,
                                "properties": {"day": {"enum": ["mon", "tue"]},
                                               "hour": {"type": "integer", "minimum": 0, "maximum": 23}}},
                       "who": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1,
                               "maxItems": 3},
                       "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "tree", "strict": True, "parameters": {
        "type": "object", "required": ["root"], "additionalProperties": False,
        "$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["v", "kids"],
                           "properties": {"v": {"type": "number"},
                                          "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                   "maxItems": 2}}}},
        "properties": {"root": {"$ref": "#/$defs/node"}, "flag": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "required": ["label", "color"],
        "properties": {"label": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                       "color": {"type": "string", "enum": ["red", "green", "blue"]}}}}},
]


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    """The trained demo Qwen3.5 (real margins) on the CPU, with a chat template in Qwen3.5's tool format."""
    from lmbundle.convert.convert import convert
    from lmbundle.engine.engine import Engine
    from tests.checkpoints import QWEN35_STYLE_TEMPLATE
    from tests.conftest import DEMO_QWEN35

    bundle = convert(str(DEMO_QWEN35), tmp_path_factory.mktemp("tools") / "demo", quant="fp16", backend="torch",
                     log=None)
    engine = Engine(bundle, backend="torch", device="cpu")
    engine.tokenizer.chat_template = QWEN35_STYLE_TEMPLATE
    return engine


def forced_call(engine, tool: dict, seed: int, max_tokens: int = 200, xml: bool = True) -> dict:
    """One reply to a forced call of `tool`, sampled at temperature 1, as the server splits it."""
    from lmbundle.engine.request import Request
    from lmbundle.engine.sampling import Sampling
    from lmbundle.serve.tool_grammar import forced_call_grammar

    done = engine.complete(Request(messages=[{"role": "user", "content": "What says the king?"}], tools=[tool],
                                   template_kwargs={"enable_thinking": False}, max_tokens=max_tokens,
                                   grammar=forced_call_grammar([tool], xml), sampling=Sampling(1.0, seed=seed)))
    parser = OutputParser(False, [tool])
    deltas = parser.push(done.text) + parser.finish(done.finish_reason == "stop")
    return {"finish": done.finish_reason, "content": "".join(d.get("content", "") for d in deltas),
            "calls": [d["tool_call"]["function"] for d in deltas if "tool_call" in d]}


@pytest.mark.parametrize("tool", TOOLS, ids=[t["function"]["name"] for t in TOOLS])
def test_forced_calls_obey_their_schema_at_temperature_1(demo_engine, tool):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(8):
        reply = forced_call(demo_engine, tool, seed)
        assert reply["finish"] == "stop" and reply["content"] == "" and len(reply["calls"]) == 1, (seed, reply)
        call = reply["calls"][0]
        assert call["name"] == tool["function"]["name"]
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_qwen3_json_calls_obey_their_schema_too(demo_engine):
    jsonschema = pytest.importorskip("jsonschema")
    for tool in TOOLS[1:3]:
        reply = forced_call(demo_engine, tool, seed=1, xml=False)
        assert reply["finish"] == "stop" and len(reply["calls"]) == 1, reply
        jsonschema.validate(json.loads(reply["calls"][0]["arguments"]), tool["function"]["parameters"])


def test_a_call_cut_off_by_max_tokens_leaves_no_tag_in_the_content(demo_engine):
    reply = forced_call(demo_engine, TOOLS[1], seed=0, max_tokens=12)
    assert reply["finish"] == "length" and reply["calls"] == [] and reply["content"] == ""
    cut = run("<tool_call>\n<function=get_weather>\n<parameter=city>\nOs", False, stopped=False)
    assert cut == {"content": "", "reasoning": "", "calls": [], "moved": None}


@pytest.mark.parametrize("parameters, refused", [
    ({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}}, "format"),
    ({"type": "object", "properties": {"n": {"type": ["string", "integer"]}}}, "string or other types"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
    ({"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
     "uniqueItems"),
])
def test_strict_refuses_what_it_cannot_enforce_and_not_strict_leaves_it_out(parameters, refused):
    from lmbundle.engine.grammar import GrammarError
    from lmbundle.serve.tool_grammar import forced_call_grammar

    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": parameters}}
    with pytest.raises(GrammarError, match=refused):
        forced_call_grammar([tool], xml=True)
    tool["function"]["strict"] = False
    assert forced_call_grammar([tool], xml=True).text
