"""The gates on the trained demo model (real top-1 margins), on both backends, and the head-clipping
lesson of the seeds: an absmax int8 head keeps every confident top-1, a clipping one flips some."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from lmbundle.convert.checkpoint import open_checkpoint
from lmbundle.convert.convert import load_checkpoint_graph
from lmbundle.engine.engine import Engine
from lmbundle.engine.request import Request
from lmbundle.gates.gate import PROMPTS, TIE_MARGIN, run_gate
from lmbundle.gates.oracle import Oracle
from lmbundle.models.linear import dequantize, quantize_absmax
from tests.conftest import DEMO_QWEN35

needs_coreai = pytest.mark.skipif(importlib.util.find_spec("coreai") is None, reason="coreai-core not installed")


@pytest.fixture(scope="module")
def oracle():
    return Oracle(str(DEMO_QWEN35))


@pytest.fixture(scope="module")
def fp16_engine(demo_bundles):
    return Engine(demo_bundles["fp16"], backend="torch", device="cpu")


def test_fp16_gate_passes_with_identical_rollouts(fp16_engine, oracle):
    """The default gate: 3 long text prompts and a chat prompt (its rollout ends at <|im_end|>), every path."""
    lines = []
    report = run_gate(fp16_engine, oracle, log=lines.append)
    assert report.passed, report.lines() + report.failures
    assert report.prompts == 4 and report.oracle_top1_last == 4 and report.vocab_covered == 1.0
    assert report.rollout_identical == 4 and report.rollout_excused == 0 and report.rollout_tokens < 4 * 32
    assert set(report.paths) == {"S=1", "chunked", "prompt path", "seeded step"} and set(report.states) == {
        "conv", "rec", "key", "value"}
    assert lines[0].startswith("gate [") and "config, recipe" in lines[0] and lines[-1].endswith("done")


def test_int8hu_gate_passes_against_fp16(demo_bundles, fp16_engine, oracle):
    report = run_gate(Engine(demo_bundles["int8hu"], backend="torch", device="cpu"), oracle, against=fp16_engine)
    assert report.passed, report.lines() + report.failures
    assert report.oracle_top1_last == 4 and report.against_identical == 4 and report.rollout_identical == 4
    assert report.seeded_min_cosine > 0.99999


def _clipped(weight: torch.Tensor, quantile: float = 0.95) -> torch.Tensor:
    """A 'symmetric with clipping' per-channel int8 quantizer: the scale comes from a high quantile
    of |w| instead of its max, so outlier weights saturate."""
    clip = torch.quantile(weight.abs(), quantile, dim=1, keepdim=True)
    scale = (clip / 127).half().float()
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def test_clipping_head_flips_confident_top1_where_absmax_does_not():
    model = load_checkpoint_graph(open_checkpoint(DEMO_QWEN35))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_QWEN35))
    head = model.lm_head.weight.detach().clone()

    def confident_flips(weight):
        model.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
        flips = 0
        for text, (ref_top1, ref_margin) in zip(PROMPTS, references):
            with torch.no_grad():
                ids = tokenizer.encode(text)
                top1 = model.forward_tokens(torch.tensor(ids), 0, model.new_state(len(ids))).argmax(-1)
            flips += int(((top1 != ref_top1) & (ref_margin >= TIE_MARGIN)).sum())
        return flips

    references = []
    for text in PROMPTS:
        with torch.no_grad():
            ids = tokenizer.encode(text)
            logits = model.forward_tokens(torch.tensor(ids), 0, model.new_state(len(ids)))
        top2 = logits.topk(2, dim=-1).values
        references.append((logits.argmax(-1), top2[:, 0] - top2[:, 1]))
    assert confident_flips(dequantize(*quantize_absmax(head))) == 0  # block-32 absmax: the int8hu default
    assert confident_flips(_clipped(head)) >= 5  # 11 on the shipped demo model


def test_gate_cli_pass_and_json(demo_bundles):
    """`--json` prints the report on stdout; `--quiet` leaves stderr without the progress lines."""
    out = subprocess.run([sys.executable, "-m", "lmbundle", "gate", str(demo_bundles["fp16"]), "--oracle",
                          str(DEMO_QWEN35), "--json", "--quiet", "--backend", "torch", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["passed"] and result["verdict"] == "PASS" and result["oracle_top1_last"] == 4
    assert result["prompts"] == 4 and "gate [" not in out.stderr


@needs_coreai
def test_coreai_gate_and_24_of_24_identity_with_torch(demo_bundles, oracle):
    """The shipped .aimodel (fp16 floats, int8 block-32 weights) on the Linux Core AI runtime: the gate
    (one long prompt: `main` S=1 and the prompt function with its states, the weights in place), and
    greedy rollouts equal to the PyTorch CPU backend's (a fork counts only where the oracle itself is at
    a tie). The runtime is a slow reference interpreter, so rollouts are short."""
    from lmbundle.gates.gate import forks_at_tie

    coreai = Engine(demo_bundles["int8hu"], backend="coreai")
    report = run_gate(coreai, oracle, prompts=PROMPTS[:1], chat=None, rollouts=8, coverage=0)
    assert report.passed, report.lines() + report.failures
    assert report.exact_worst < 0.1 and report.state_worst < 0.1 and report.rollout_identical == 1
    assert "prompt path" in report.paths and not report.aimodel_bad and len(report.aimodel_reads) == 2
    torch_engine = Engine(demo_bundles["int8hu"], backend="torch", device="cpu")
    prompts = ["KING HENRY:\nNow, lords,", "ROMEO:\nBut soft,", "To be, or not to be,", "Good morrow,",
               "What news from the court?", "O, my lord,", "Enter a messenger.", "My gracious sovereign,",
               "JULIET:\nO Romeo,", "HAMLET:\nWhat a piece", "The king is dead.", "Sweet lady,",
               "Come, let us go.", "I pray you, sir,", "FALSTAFF:\nBy the Lord,", "Alas, poor",
               "Now is the winter", "All the world's a stage,", "Friends, Romans,", "If music be",
               "Once more unto", "The quality of mercy", "Is this a dagger", "Shall I compare thee"]
    identical = ties = 0
    for text in prompts:
        ids = coreai.encode(text)
        rollout = Request(ids, max_tokens=8, ignore_eos=True)
        ours, theirs = coreai.complete(rollout).tokens, torch_engine.complete(rollout).tokens
        if ours == theirs:
            identical += 1
        elif forks_at_tie(oracle, ids, ours, theirs) or forks_at_tie(oracle, ids, theirs, ours):
            ties += 1
    assert identical + ties == 24 and identical >= 20, (identical, ties)


def test_one_verdict_line_covers_text_and_image():
    from lmbundle.gates.gate import GateReport, verdict
    from lmbundle.gates.image_gate import ImageGateReport

    text, image = GateReport("b", "torch", "fp16"), ImageGateReport(prompts=3)
    assert verdict(text, image) == "PASS" and verdict(text, None) == "PASS"
    image.failures.append("image: vision embeddings cosine 0.2 < 0.9997")
    assert verdict(text, image) == "FAIL: image: vision embeddings cosine 0.2 < 0.9997"
    assert not any("PASS" in line or "FAIL" in line for line in text.lines() + image.lines())
