"""The reasoning / tool-call parser on hand-written Qwen3.5 outputs: well-formed, malformed, and split
across stream chunks at every position (the split result must equal the whole-text result)."""

from __future__ import annotations

import json

import pytest

from lmbundle.serve.tools import OutputParser, convert_value

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
