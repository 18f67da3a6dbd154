"""Every path a bundle computes a prompt through, run on the same tokens as the simulated oracle.

- S=1 (`rollout`): the prompt fed one token a step from a zero state (the exported graph's contract,
  Core AI's `main`, the PyTorch step, a CUDA graph replay on CUDA), then greedy decoding with the
  backend's own token choice (Core AI's in-graph argmax) until a stop id or the rollout length: logits
  at every position.
- chunked (`chunked_logits`): one multi-token forward over the whole sequence (the PyTorch prefill's
  graph): logits at every position.
- the prompt path (`prompt_path`): what `run` / `chat` / `serve` prefill with: the PyTorch backend's
  chunks (CUDA graphs on CUDA), Core AI's prompt function for whole chunks then `main` for the last
  token. Its states are compared with the oracle's cache, then that step's logits.
- a step from a state seeded with the oracle's cache (`seeded_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.format import STATE_NAMES
from ..bundle.load import state_spec
from ..engine.engine import Engine
from ..engine.sampling import Sampling
from .oracle import Oracle, state_from_cache
from .quality import QualitySums

PROMPT_CHUNK = 64  # the PyTorch prompt path's chunk in the gate: sequences of the gate span several


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row: max over the last axis of |ours - reference|, over the reference's spread (std)."""
    ours, reference = ours.reshape(-1, reference.shape[-1]).float(), reference.reshape(-1, reference.shape[-1]).float()
    error = (ours - reference).abs().amax(-1) / reference.std(-1).clamp_min(1e-6)
    return torch.where(torch.isfinite(ours).all(-1), error, torch.full_like(error, torch.inf))


@dataclass
class Rollout:
    """The S=1 path over a prompt and the bundle's own greedy continuation."""

    tokens: list[int]  # prompt + the generated tokens fed back (the last choice, a stop id, is not fed)
    logits: torch.Tensor  # [len(tokens), V]: at every fed position
    chosen: list[int]  # the generated tokens, the stop id included


def rollout(engine: Engine, ids: list[int], steps: int) -> Rollout:
    """Feed `ids` S=1 from a zero state, then decode greedily (the backend picks each token, as in
    `Engine.generate`) until one of the bundle's stop ids or `steps` tokens."""
    backend, device = engine.backend, engine.device
    backend.reset(len(ids) + steps + 1)
    rows, handle = [], None
    for position, token in enumerate(ids):
        handle = backend.step(torch.tensor([[token]], device=device), position)
        rows.append(backend.logits(handle))
    tokens, chosen = list(ids), []
    while len(chosen) < steps:
        token = backend.next_token(handle, Sampling(), None)
        value = backend.read_token(token)
        chosen.append(value)
        if value in engine.stop_ids or len(chosen) == steps:
            break
        handle = backend.step(token, len(tokens))
        tokens.append(value)
        rows.append(backend.logits(handle))
    return Rollout(tokens, torch.stack(rows), chosen)


def chunked_logits(engine: Engine, ids: list[int]) -> torch.Tensor | None:
    """Logits at every position of one chunked forward (the PyTorch prefill's graph); None on a backend
    without one (Core AI's prompt function has no head: `prompt_path` covers it)."""
    backend = engine.backend
    if not backend.resumable:  # the PyTorch backend is the one whose model and state the gate can reach
        return None
    backend.reset(len(ids) + 1)
    with torch.inference_mode():
        logits = backend.model.forward_tokens(torch.tensor(ids, device=engine.device), 0, backend.state)
    return logits.float().cpu()


def prompt_chunk(engine: Engine) -> int:
    """The prompt path's chunk: Core AI's prompt function's length (0: the asset has none)."""
    return engine.backend.prefill_chunk if engine.backend_name == "coreai" else PROMPT_CHUNK


def prompt_length(engine: Engine, length: int) -> int:
    """How much of a sequence the prompt path is fed: all of it on PyTorch; on Core AI whole prompt
    function chunks and one `main` step (its S=1 tail would cost what the S=1 path already ran)."""
    chunk = prompt_chunk(engine)
    if engine.backend_name != "coreai" or not chunk:
        return length
    return (length - 1) // chunk * chunk + 1


def prompt_path(engine: Engine, ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The prompt prefilled the way the engine prefills it: (logits of its last token [V], the states
    after it {conv, rec, key, value}, KV cut to the prompt)."""
    backend = engine.backend
    backend.reset(len(ids) + 1)
    handle = backend.prefill(ids, prompt_chunk(engine))
    logits = backend.logits(handle)  # waits for every call before it
    return logits, read_states(engine, len(ids))


def read_states(engine: Engine, length: int) -> dict[str, torch.Tensor]:
    """The backend's states after `length` positions, as float tensors in `State`'s layout."""
    backend = engine.backend
    if backend.resumable:
        return {name: t.float().cpu() for name, t in backend.snapshot_prefix(length).items() if t.numel()}
    states = {}
    for field, name in STATE_NAMES.items():
        if name in backend.states:
            array = torch.from_numpy(np.array(backend.states[name].numpy(), dtype=np.float32))
            states[field] = array[..., :length, :] if field in ("key", "value") else array
    return states


def state_errors(engine: Engine, states: dict[str, torch.Tensor], cache, length: int) -> dict[str, float]:
    """Per state (conv, rec, key, value): the worst layer's max |ours - oracle| / std(oracle)."""
    spec = state_spec(engine.bundle)
    expected = spec.new(length, dtype=torch.float32)
    state_from_cache(cache, spec, expected)
    errors = {}
    for field, reference in expected.tensors().items():
        if field in states and reference.numel():
            ours = states[field].reshape(reference.shape[0], -1)
            errors[field] = relative_error(ours, reference.reshape(reference.shape[0], -1)).max().item()
    return errors


def seeded_step(engine: Engine, cache, ids: list[int], token: int) -> torch.Tensor:
    """One step for `token` after `ids`, from a state seeded with the oracle's cache after `ids`."""
    backend = engine.backend
    backend.reset(len(ids) + 1)
    spec = state_spec(engine.bundle)
    backend.load_state(lambda state: state_from_cache(cache, spec, state))
    return backend.logits(backend.step(torch.tensor([[token]], device=engine.device), len(ids)))


def excusable(margin: float, std: float, bound: float) -> bool:
    """A greedy fork is arithmetic only where the oracle's logits of the two tokens are closer than twice
    the backend's bound (two logits each off by at most d can swap only then)."""
    return margin < 2 * bound * std


def _compare(report, path: str, ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    error = relative_error(ours, reference)
    report.paths[path] = max(report.paths.get(path, 0.0), error.max().item())
    report.exact_worst = max(report.exact_worst, error.max().item())
    report.exact_worst_abs = max(report.exact_worst_abs, (ours.reshape(reference.shape) - reference).abs().max().item())
    report.exact_positions_over += int((error > report.bound).sum())
    return error


def _check_rollout(report, run: Rollout, logits: torch.Tensor, start: int, label: str) -> None:
    """Each token the bundle chose against the simulated oracle's logits at that position (teacher-forced
    on the bundle's own path: equal choices all the way make the oracle's greedy path the same)."""
    forked = False
    for offset, token in enumerate(run.chosen):
        row = logits[start - 1 + offset]
        best = int(row.argmax())
        if token == best:
            continue
        margin = float(row[best] - row[token])
        if excusable(margin, float(row.std()), report.bound):
            report.rollout_excused += 1
            report.excused_margins.append(round(margin / float(row.std()), 4))
        else:
            forked = True
            report.rollout_forks.append(f"{label} token {offset}: {token} for {best}, margin "
                                        f"{margin / float(row.std()):.3g} std")
    report.rollout_identical += int(not forked)
    report.rollout_tokens += len(run.chosen)


def run_paths(engine: Engine, oracle: Oracle, simulated: Oracle, report, sequences: list[list[int]],
              randoms: list[list[int]], steps: int, progress) -> QualitySums:
    """The gate's part A.3-4: every sequence through every path the backend has, against one simulated
    oracle forward each (its logits and cache serve every path); returns the quantization sums (part B)."""
    quality, fed = QualitySums(), set()
    for k, ids in enumerate(sequences, 1):
        progress(f"prompt {k}/{len(sequences)} ({len(ids)} tokens): S=1 and a greedy rollout of up to {steps}")
        run = rollout(engine, ids, steps)
        tokens = run.tokens
        reference, exact = simulated.forward(tokens), oracle.forward(tokens).logits
        quality.add(reference.logits, exact)
        fed.update(tokens)
        _compare(report, "S=1", run.logits, reference.logits)
        report.oracle_top1_last += int(run.logits[len(ids) - 1].argmax() == exact[len(ids) - 1].argmax())
        _check_rollout(report, run, reference.logits, len(ids), f"prompt {k}")
        progress(f"prompt {k}/{len(sequences)}: the prompt path, a seeded step")
        _other_paths(engine, simulated, report, tokens, reference)
        if len(tokens) > 1:
            step = seeded_step(engine, simulated.forward(tokens[:-1]).cache, tokens[:-1], tokens[-1])
            _compare(report, "seeded step", step, reference.logits[-1])
            cosine = torch.nn.functional.cosine_similarity(step, reference.logits[-1], dim=0).item()
            report.seeded_min_cosine = min(report.seeded_min_cosine, cosine)
        report.positions += len(tokens)
    for k, ids in enumerate(randoms, 1):
        progress(f"random-token prompt {k}/{len(randoms)} ({len(ids)} tokens)")
        reference = simulated.forward(ids)
        quality.add(reference.logits, oracle.forward(ids).logits)
        fed_here = _other_paths(engine, simulated, report, ids, reference)
        fed.update(ids[:fed_here])
        report.positions += fed_here
    report.vocab_covered = len(fed) / int(engine.bundle.info["config"]["vocab_size"])
    _failures(report)
    return quality


def _other_paths(engine: Engine, simulated: Oracle, report, tokens: list[int], reference) -> int:
    """The chunked forward (all positions) and the prompt path (its states, then its last logits);
    returns how many of the tokens these paths fed."""
    chunked = chunked_logits(engine, tokens)
    if chunked is not None:
        _compare(report, "chunked", chunked, reference.logits)
    length, chunk = prompt_length(engine, len(tokens)), prompt_chunk(engine)
    if not chunk or length <= chunk:
        return len(tokens) if chunked is not None else 0
    cache = reference.cache if length == len(tokens) else simulated.forward(tokens[:length]).cache
    logits, states = prompt_path(engine, tokens[:length])
    _compare(report, "prompt path", logits, reference.logits[length - 1])
    for field, error in state_errors(engine, states, cache, length).items():
        report.states[field] = max(report.states.get(field, 0.0), error)
    return len(tokens) if chunked is not None else length


def _failures(report) -> None:
    bound = report.bound
    over = [f"{path} {value:.3g}" for path, value in report.paths.items() if not value <= bound]
    if over:
        report.failures.append(f"logits differ from the simulated oracle: max|diff|/std {', '.join(over)} > "
                               f"{bound:g} ({report.exact_positions_over} positions)")
    over = [f"{name} {value:.3g}" for name, value in report.states.items() if not value <= bound]
    if over:
        report.failures.append(f"states after the prompt path differ from the oracle's cache: max|diff|/std "
                               f"{', '.join(over)} > {bound:g}")
    if report.rollout_forks:
        report.failures.append(f"greedy rollouts fork from the simulated oracle beyond twice the bound {bound:g}: "
                               f"{', '.join(report.rollout_forks[:3])}")
