"""The exported `.aimodel` step, run by Core AI's (Linux CPU) runtime, against the torch graph's step.

fp32 and int8 (block-32 blockwise constants) assets on the tiny checkpoint: teacher-forced logits
within fp16 rounding (the asset's logits are fp16, as Apple's engine takes them) and the same argmax
over 16 steps, with the dynamic KV states grown from 4 slots by copying; a pipelined greedy rollout
(each step fed the previous step's on-runtime argmax) equal to torch's; prefill chunks + steps equal
to S=1 steps (Apple's balanced chunks, the asset's prompt function padding each to its width); the
compile cache hit, rebuilt when damaged; a damaged asset
is a LmbundleError, never a crash.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

pytest.importorskip("coreai.runtime")
pytest.importorskip("coreai_torch")

from lmbundle.bundle.coreai import COMPILED_FILE, MANIFEST  # noqa: E402
from lmbundle.convert.checkpoint import open_checkpoint
from lmbundle.convert.convert import load_checkpoint_graph  # noqa: E402
from lmbundle.convert.coreai_export import export_aimodel  # noqa: E402
from lmbundle.engine import coreai_backend  # noqa: E402
from lmbundle.engine.coreai_backend import CoreAIBackend  # noqa: E402
from lmbundle.engine.sampling import Sampling  # noqa: E402
from lmbundle.errors import LmbundleError  # noqa: E402
from lmbundle.models.linear import Linear  # noqa: E402
from tests import checkpoints  # noqa: E402

CAPACITY, STEPS = 32, 16


def assert_fp16_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the fp16 rounding of the asset's logits output (half an ulp: 2^-11 relative)."""
    torch.testing.assert_close(ours, ref.float(), rtol=1e-3, atol=1e-4)


def quantize_all(model: torch.nn.Module, block: int = 32) -> torch.nn.Module:
    """int8 every Linear (block-32 absmax), the layout the exporter turns into blockwise constants."""
    for module in model.modules():
        if isinstance(module, Linear) and not module.quantized:
            module.quantize_(block)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (torch model, .aimodel path)} for fp32 and int8, from a tiny checkpoint with the real
    models' interleaved M-RoPE (its `i % 3` is an op the converter must lower)."""
    folder = tmp_path_factory.mktemp("coreai")
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    config = dict(checkpoints.TINY_CONFIGS["base"], rope_parameters=rope)
    checkpoint = checkpoints.make_qwen35(folder / "ckpt", **config)
    models = {
        "fp32": load_checkpoint_graph(open_checkpoint(checkpoint)),
        "int8": quantize_all(load_checkpoint_graph(open_checkpoint(checkpoint))),
    }
    return {kind: (model, export_aimodel(model, CAPACITY, folder / f"{kind}.aimodel", prefill_chunk=8).path)
            for kind, model in models.items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("coreai-cache")


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_steps_match_torch(exported, cache, kind, monkeypatch):
    model, path = exported[kind]
    tokens = torch.randint(0, model.cfg.vocab_size, (STEPS,), generator=torch.Generator().manual_seed(1))
    state = model.new_state(CAPACITY)
    monkeypatch.setattr(coreai_backend, "INITIAL_CAPACITY", 4)  # Apple's engine starts at 256; here 4 -> 8 -> 16
    with CoreAIBackend(path, cache, max_context=CAPACITY) as backend:
        lengths = []
        for position, token in enumerate(tokens.tolist()):
            handle = backend.step(token, position)
            lengths.append(backend.capacity)
            with torch.no_grad():
                ref = model.step(torch.tensor([[token]]), torch.tensor([position]), state, CAPACITY)
            assert_fp16_close(backend.read_logits(handle), ref)
            assert backend.read_token(handle) == ref.argmax().item(), f"argmax differs at step {position}"
        assert sorted(set(lengths)) == [4, 8, 16], lengths

        # the engine's greedy pipeline: each step is fed the previous step's in-graph argmax, and all
        # are enqueued before any token is read
        prompt = tokens[:4].tolist()
        backend.reset(len(prompt) + STEPS)
        tokens_in_flight = [backend.next_token(backend.prefill(prompt), Sampling(), None)]
        for position in range(len(prompt), len(prompt) + STEPS - 1):
            tokens_in_flight.append(backend.next_token(backend.step(tokens_in_flight[-1], position), Sampling(), None))
        ours = [backend.read_token(t) for t in tokens_in_flight]

    state, greedy = model.new_state(CAPACITY), []
    with torch.no_grad():
        for position in range(len(prompt) + STEPS - 1):
            token = prompt[position] if position < len(prompt) else greedy[-1]
            logits = model.step(torch.tensor([[token]]), torch.tensor([position]), state, CAPACITY)
            if position >= len(prompt) - 1:
                greedy.append(logits.argmax().item())
    assert ours == greedy


def test_int8_asset_is_smaller_and_functions_share_weights(exported):
    """int8 stores ~1/4 of the linear weights' bytes; `main` and `prefill` share one copy of them."""
    size = {kind: sum(f.stat().st_size for f in path.iterdir()) for kind, (_, path) in exported.items()}
    model = exported["fp32"][0]
    linear = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size["fp32"] - size["int8"] > 0.6 * linear, (size, linear)
    assert size["fp32"] < 1.5 * weights, (size, weights)  # two copies would be > 2x


def test_compile_cache_hit_and_rebuild(exported, tmp_path):
    _, path = exported["int8"]
    with CoreAIBackend(path, tmp_path) as first:
        assert not first.cache_hit
        entry, token = first.compiled, first.read_token(first.step(3, 0))
    with CoreAIBackend(path, tmp_path) as second:
        assert second.cache_hit and second.compiled == entry

    compiled = entry / COMPILED_FILE
    data = bytearray(compiled.read_bytes())
    data[len(data) // 2] ^= 0xFF
    compiled.write_bytes(data)
    with CoreAIBackend(path, tmp_path) as rebuilt:
        assert not rebuilt.cache_hit
        assert rebuilt.read_token(rebuilt.step(3, 0)) == token

    (entry / MANIFEST).unlink()  # an entry cut short before its manifest
    with CoreAIBackend(path, tmp_path) as rebuilt:
        assert not rebuilt.cache_hit
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_damaged_asset_is_a_user_error(exported, tmp_path):
    _, path = exported["fp32"]
    damaged = shutil.copytree(path, tmp_path / "damaged.aimodel")
    bytecode = damaged / "main.mlirb"
    bytecode.write_bytes(bytecode.read_bytes()[:1000])
    with pytest.raises(LmbundleError, match="does not match main.hash"):
        CoreAIBackend(damaged, tmp_path / "cache")

    (damaged / "main.hash").write_bytes(hashlib.sha256(bytecode.read_bytes()).digest())
    with pytest.raises(LmbundleError, match="could not compile"):
        CoreAIBackend(damaged, tmp_path / "cache")

    with pytest.raises(LmbundleError, match="not a Core AI asset"):
        CoreAIBackend(tmp_path / "missing.aimodel", tmp_path / "cache")


def test_static_position_input(exported, tmp_path):
    """ramp=False: `position_ids` is the [1, 1] position itself; same logits as the torch step."""
    model, _ = exported["fp32"]
    path = export_aimodel(model, CAPACITY, tmp_path / "static.aimodel", ramp=False, prefill_chunk=0).path
    state = model.new_state(CAPACITY)
    with CoreAIBackend(path, tmp_path / "cache") as backend:
        assert not backend.ramp
        for position, token in enumerate([7, 3, 11, 5]):
            with torch.no_grad():
                ref = model.step(torch.tensor([[token]]), torch.tensor([position]), state, CAPACITY)
            assert_fp16_close(backend.read_logits(backend.step(token, position)), ref)


def test_load_state_seeds_the_runtime(exported, cache):
    """A state written on the host (as the HF-seeded gate does) is the one the next step reads."""
    model, path = exported["fp32"]
    state = model.new_state(CAPACITY)
    with torch.no_grad():
        for position, token in enumerate([9, 4, 17, 2, 30]):
            model.step(torch.tensor([[token]]), torch.tensor([position]), state, CAPACITY)
    with CoreAIBackend(path, cache) as backend:
        assert backend.capacity == 256  # a bare asset: no max_context, Apple's initial length
        backend.load_state(lambda target: [target.tensors()[k][..., : v.shape[3], :].copy_(v) if k in ("key", "value")
                                           else target.tensors()[k].copy_(v) for k, v in state.tensors().items()])
        logits = backend.read_logits(backend.step(12, 5))
    with torch.no_grad():
        ref = model.step(torch.tensor([[12]]), torch.tensor([5]), state, CAPACITY)
    assert_fp16_close(logits, ref)


def test_asset_has_dynamic_kv_states_and_a_prefill_function(exported):
    """The descriptor the hosts read: the KV pair first with sequence dim -1 (grown by the host), the GDN
    states fixed, and `prefill` ([1, q] ids, no head, no outputs) over the same states."""
    from lmbundle.bundle.check import read_signatures

    model, path = exported["int8"]
    functions = read_signatures(path)
    assert list(functions) == ["main", "prefill"]
    main, prefill = functions["main"], functions["prefill"]
    assert main.names("states") == ["keyCache", "valueCache", "convState", "recState"]
    states = dict(main.states)
    assert states["keyCache"].shape == states["valueCache"].shape == [1, 1, 2, -1, 32]
    assert -1 not in states["convState"].shape and -1 not in states["recState"].shape
    assert [(n, t.dtype, t.shape) for n, t in main.inputs] == [("input_ids", "Int32", [1, 1]),
                                                               ("position_ids", "Int32", [1, -1])]
    assert [(n, t.dtype, t.shape) for n, t in main.outputs] == [("logits", "Float16", [1, 1, model.cfg.vocab_size]),
                                                                ("next_token", "Int32", [1, 1])]
    assert prefill.names("states") == main.names("states") and prefill.outputs == []
    assert dict(prefill.inputs)["input_ids"].shape == [1, -1]


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_prefill_function_equals_s1_steps(exported, cache, kind):
    """A 29-token prompt as Apple's engine sends it with 8-token chunks (28 tokens in 4 balanced chunks of 7
    through `prefill`, the last through `main`), then 8 greedy steps: the same tokens as 29 S=1 steps (and
    as the torch graph), logits within fp16 rounding."""
    model, path = exported[kind]
    prompt = torch.randint(0, model.cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(5)).tolist()
    routes = {}
    with CoreAIBackend(path, cache, max_context=CAPACITY + 16, prefill_chunk=8) as backend:
        assert backend.prefill_chunk == 8
        for chunk in (0, 8):
            backend.reset(len(prompt) + 8)
            handle = backend.prefill(prompt, chunk)
            logits = backend.read_logits(handle)
            tokens = [backend.next_token(handle, Sampling(), None)]
            for position in range(len(prompt), len(prompt) + 7):
                tokens.append(backend.next_token(backend.step(tokens[-1], position), Sampling(), None))
            routes[chunk] = (logits, [backend.read_token(t) for t in tokens])
    assert routes[8][1] == routes[0][1]
    assert_fp16_close(routes[8][0], routes[0][0])
    state, greedy = model.new_state(CAPACITY + 16), []
    with torch.no_grad():
        for position in range(len(prompt) + 7):
            token = prompt[position] if position < len(prompt) else greedy[-1]
            logits = model.step(torch.tensor([[token]]), torch.tensor([position]), state, CAPACITY + 16)
            if position >= len(prompt) - 1:
                greedy.append(logits.argmax().item())
    assert routes[8][1] == greedy


def test_position_past_the_context_is_a_user_error(exported, cache):
    _, path = exported["fp32"]
    with CoreAIBackend(path, cache, max_context=CAPACITY) as backend:
        with pytest.raises(LmbundleError, match="do not fit"):
            backend.step(3, CAPACITY)
