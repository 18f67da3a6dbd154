"""The grammar constraint alone (lmbundle/engine/grammar.py), driven by random logits: whatever the "model"
prefers, the text parses and fits the schema, and it ends within the token budget."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from lmbundle.engine.grammar import GrammarConstraint, GrammarError, json_grammar
from tests.conftest import DEMO_QWEN35

TREE = {"$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["v", "kids"],
                           "properties": {"v": {"type": "integer"},
                                          "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
RECORD = {"type": "object", "additionalProperties": False, "required": ["id", "score", "ok", "who", "tags"],
          "properties": {"id": {"type": "integer"}, "score": {"type": "number"}, "ok": {"type": "boolean"},
                         "who": {"enum": ["a", "b"]}, "tags": {"type": "array", "items": {"type": "string"}}}}


def tree_fits(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"v", "kids"} and isinstance(value["v"], int)
            and isinstance(value["kids"], list) and all(tree_fits(k) for k in value["kids"]))


def record_fits(value) -> bool:
    return (isinstance(value, dict) and set(value) == set(RECORD["required"]) and isinstance(value["id"], int)
            and isinstance(value["score"], (int, float)) and isinstance(value["ok"], bool)
            and value["who"] in ("a", "b") and all(isinstance(t, str) for t in value["tags"]))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_QWEN35)


def constrained(tokenizer, schema, budget: int, seed: int) -> tuple[str, int]:
    vocab = len(tokenizer) + 13  # model rows past the tokenizer, as real checkpoints have
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    constraint = GrammarConstraint(json_grammar(schema), tokenizer, vocab, stops, torch.device("cpu"), budget=budget)
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(budget):
        logits = constraint(torch.randn(vocab, generator=generator) * 3)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if token in stops:
            return tokenizer.decode(tokens), len(tokens)
        constraint.accept(token)
        tokens.append(token)
    raise AssertionError(f"no stop token within {budget} tokens: {tokenizer.decode(tokens)!r}")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("schema, fits, budget", [(TREE, tree_fits, 60), (RECORD, record_fits, 80),
                                                  (None, lambda v: isinstance(v, dict), 40)])
def test_random_logits_always_give_fitting_json_within_the_budget(tokenizer, schema, fits, budget, seed):
    text, used = constrained(tokenizer, schema, budget, seed)
    assert fits(json.loads(text)) and used < budget


def test_unusable_schema_is_a_grammar_error():
    with pytest.raises(GrammarError):
        json_grammar({"type": "object", "$ref": "#/nowhere"})
