"""The `lmbundle` command: convert, run, chat, bench, gate, serve, info.

Problems with the user's input end as one line `error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from . import __version__
from .bundle.hosts import HOSTS
from .engine import BACKENDS
from .errors import LmbundleError
from .quiet import quiet


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ("none": off unless given), unless the help already says it or
    it is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.required or action.default == argparse.SUPPRESS:
            return text
        default = "none" if action.default in (None, []) else "%(default)s"
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Help, **kwargs)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (made by `lmbundle convert`), or a checkpoint folder or hub id "
                   "(converted once to int8hu into ~/.cache/lmbundle/bundles, or $LMBUNDLE_CACHE/bundles)")
    p.add_argument("--backend", choices=BACKENDS, help="default: the fastest present (PyTorch on Linux)")
    p.add_argument("--device", help="torch device (cpu, cuda, mps); default: the best present")
    p.add_argument("--prefill", choices=["s1", "chunked"], default="chunked",
                   help="feed the prompt in chunks (on the PyTorch backend 13x faster for a 0.8B on "
                        "2 CPU cores, ~20x on an H100) or as S=1 steps (one token a step, the contract of the "
                        "engine the seed bundles run on: README). The Core AI backend chunks through the asset's "
                        "`prefill` function, in its own chunk size (64)")
    p.add_argument("--chunk", type=int, default=256,
                   help="chunk size of --prefill chunked, and the prefix cache's block: prompts are snapshotted at "
                        "its multiples (a piece never crosses one)")
    p.add_argument("--no-prompt-copies", action="store_true",
                   help="CUDA: do not keep the int8 weights expanded for prompt chunks (saves ~2.7 GB of GPU memory "
                        "for a 2B; each prompt chunk then expands them again)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-g", "--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens this likely")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: a random one)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmbundle", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmbundle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # its parsers are _Parsers too

    p = sub.add_parser("convert", help="checkpoint folder or hub id -> bundle")
    p.add_argument("source", help="checkpoint folder or hub id (e.g. Qwen/Qwen3.5-2B)")
    p.add_argument("-o", "--out", required=True, help="output bundle folder (must not exist)")
    p.add_argument("--quant", default="int8hu", help="fp16 | int8lin | int8hu")
    p.add_argument("--head-quant", default="block32", help="block32 | perchan (int8hu's head)")
    p.add_argument("--backend", default="all", help="all | torch | coreai: which graphs the bundle carries")
    p.add_argument("--max-context", type=int, default=4096, help="largest prompt + output, in tokens")
    p.add_argument("--name", help="bundle name (default: from the source and quant mode)")
    p.add_argument("--max-images", type=int, default=1,
                   help="image-text checkpoints: images per prompt (1: the hosts' contract; more runs "
                        "on lmbundle's own engines only)")

    p = sub.add_parser("run", help="generate from a prompt, streaming")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--image", action="append", default=[], help="image file (VLM bundles); repeatable")
    p.add_argument("--stats", action="store_true", help="print token counts and speed at the end")

    p = sub.add_parser("chat", help="interactive chat (/image PATH attaches an image, /reset, /help, /quit)")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--image", action="append", default=[], help="image for the first turn (VLM bundles)")

    p = sub.add_parser("bench", help="prefill and decode speed, and %% of the memory-bandwidth ceiling")
    _add_engine_args(p)
    p.add_argument("-p", "--prompt-tokens", type=int, default=128, help="prompt length")
    p.add_argument("-g", "--gen-tokens", type=int, default=256, help="tokens generated per trial")
    p.add_argument("-n", "--trials", type=int, default=3, help="trials (the best is reported)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(prefill="s1")  # the seed's llm-benchmark protocol: prefill tok/s of S=1 steps

    p = sub.add_parser("gate", help="numeric gates against the fp32 transformers oracle")
    p.add_argument("bundle", nargs="?", help="the bundle to gate (or --server)")
    p.add_argument("--server", metavar="URL", help="gate a running OpenAI-compatible server instead of a bundle "
                   "(ours, llama-server, vLLM, SGLang): its greedy tokens and log-probs against the oracle's")
    p.add_argument("--model", help="with --server: the model to gate (default: the one the server lists)")
    p.add_argument("--api-key", help="with --server: its bearer token (default: LMBUNDLE_API_KEY, OPENAI_API_KEY)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "4bit"],
                   help="with --server: the class whose log-prob bound applies (default: the model name's, else "
                        "the tightest the figures fit)")
    p.add_argument("--oracle", required=True, help="the original checkpoint (folder or hub id)")
    p.add_argument("--against", help="another bundle (e.g. fp16) that greedy rollouts must equal")
    p.add_argument("--coverage", type=int, help="token ids fed as random-token prompts (default: the whole "
                   "vocabulary up to 8192 on PyTorch, 256 on Core AI)")
    p.add_argument("--backend", choices=BACKENDS, help="default: the fastest present (PyTorch on Linux)")
    p.add_argument("--device", help="torch device (cpu, cuda, mps); default: the best present")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines (on stderr) while the gate runs")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web chat page")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require this bearer token on every request but /health and the page (better: "
                   "set LMBUNDLE_API_KEY, which other local users cannot read from the process list; default: none)")
    p.add_argument("--allow-remote", action="store_true", help="needed to listen on a non-loopback address")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for a slot (then 429)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded at once (slots): one alone runs the one-request step, more share a "
                        "batched step")
    p.add_argument("--always-batched", action="store_true",
                   help="CUDA: run the batched step even for one request alone, so a greedy answer is bit for bit "
                        "the same at any load (the one-request step is faster but its bf16 arithmetic differs)")
    p.add_argument("--token-budget", type=int, default=512,
                   help="with --max-batch > 1: tokens per scheduler iteration, decode rows + prompt pieces "
                        "(smaller: steadier decode while prompts arrive; larger: sooner first tokens)")
    p.add_argument("--cache-mem", default="1G",
                   help="prefix cache budget on the device, e.g. 512M, 2G (0: no prefix cache)")
    p.add_argument("--cache-host-mem", help="host memory the prefix cache spills to (default 4x --cache-mem)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request time limit in seconds")
    p.add_argument("--allow-files", action="append", default=[], metavar="DIR",
                   help="let file:// image URLs read images inside this folder (repeatable)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: the bundle's)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of this origin (https://app.example.com) call the API; repeatable")
    p.add_argument("--log-requests", action="store_true",
                   help="one line per request on stderr: method, path, status, tokens, time (also with -v)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request's headers, and then its body, may take to arrive (then 408)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="seconds a kept-alive connection may wait for its next request")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections (then 503), lowered to fit the open-file limit")

    p = sub.add_parser("info", help="what a bundle holds: config, quant, sizes, bytes per token")
    p.add_argument("bundle")
    p.add_argument("--check", action="store_true",
                   help="check the bundle against each host's rules: Apple's loader and engine at 86b363d and on "
                        "main, and the zoo's engine (exit status 1 if one fails)")
    p.add_argument("--host", action="append", choices=HOSTS,
                   help="with --check: only this host (repeatable; default: all, one column each)")
    p.add_argument("--target", choices=("macos", "ios"), default="macos",
                   help="with --check: the device class (ios adds the iPhone's KV and memory warnings)")
    p.add_argument("--json", action="store_true", help="with --check: the rules as JSON")
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true",
                             help="keep the libraries' known-harmless warnings and log lines (lmbundle/quiet.py)")
    return parser


def _load(args, solo_step: bool = True, **engine):
    """The Python API's Model for the command's bundle (`engine`: more of the Engine's options; `solo_step`:
    CudaOptions')."""
    from .api import load
    from .engine.torch_backend import CudaOptions

    chunk = _chunk(args)
    return load(args.bundle, backend=args.backend, device=args.device, cache_block=chunk,
                prefill_chunk=chunk if args.prefill == "chunked" else 0,
                cuda=CudaOptions(prompt_copies=not args.no_prompt_copies,
                                 solo_step=solo_step), **engine)


def _chunk(args) -> int:
    if args.chunk < 1:
        raise LmbundleError(f"--chunk must be at least 1 (got {args.chunk})")
    return args.chunk


def _sampling(args) -> dict:
    if args.max_new_tokens < 1:
        raise LmbundleError(f"-g/--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    return {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


def cmd_convert(args) -> None:
    from .bundle.format import open_bundle
    from .convert.convert import convert

    try:
        out = convert(args.source, args.out, quant=args.quant, head_quant=args.head_quant, backend=args.backend,
                      max_context=args.max_context, name=args.name, max_images=args.max_images)
    except OSError as exc:  # nothing is left half-made: the bundle is written beside -o and renamed at the end
        raise LmbundleError(f"{args.out}: cannot write the bundle there ({exc.strerror or exc})") from None
    _print_info(open_bundle(out))


def _print_info(bundle) -> None:
    info = bundle.info
    bpt = info["bytes_per_token"]
    print(f"{bundle.path}: {bundle.name} ({info['architecture']}, {info['quant']['mode']}, head {info['quant']['head']})")
    print(f"  size on disk {info['size_on_disk'] / 1e6:.2f} MB; reads {bpt['total_at_empty_context'] / 1e6:.2f} MB "
          f"per token (weights {bpt['weights'] / 1e6:.2f} MB + GDN state {bpt['gdn_state'] / 1e6:.2f} MB) "
          f"+ {bpt['kv_per_position']} B per cached position")
    assets = ", ".join(bundle.metadata.get("assets", {}).values()) or "none (PyTorch weights only)"
    print(f"  max context {bundle.max_context}; Core AI asset: {assets}")
    if vision := bundle.metadata.get("vision"):
        print(f"  vision: {vision['image_size']}x{vision['image_size']} images -> {vision['tokens_per_image']} tokens, "
              f"up to {vision['max_images']} per prompt; encoder {vision['encoder']['depth']} blocks, "
              f"{vision['num_deepstack']} DeepStack levels, {vision['dtype']}; Core AI asset: {vision.get('asset') or 'none'}")


def cmd_info(args) -> None:
    from .bundle.format import open_bundle

    if args.check:
        from .bundle.check import check_bundle

        report = check_bundle(args.bundle, hosts=args.host or HOSTS, target=args.target)
        print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
        if not report.passed:
            raise SystemExit(1)
        return
    _print_info(open_bundle(args.bundle))


def cmd_run(args) -> None:
    model = _load(args)
    if args.image or args.chat:
        answer = model.stream_chat([model.user(args.prompt, args.image)], **_sampling(args))
    else:
        answer = model.stream(args.prompt, **_sampling(args))
    model.engine.warmup()  # after the prompt was checked, before it is timed
    for piece in answer:
        sys.stdout.write(piece)
        sys.stdout.flush()
    stats, finish = answer.stats, answer.finish_reason
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; prefill "
              f"{stats.prefill_tok_s:.1f} tok/s (first token after {1000 * stats.prefill_seconds:.1f} ms), decode "
              f"{stats.decode_tok_s:.1f} tok/s; stop: {finish}]",
              file=sys.stderr)


CHAT_HELP = """/image PATH  attach an image to your next message (VLM bundles)
/reset       start the conversation over (the system prompt stays)
/help        this list
/quit        end the chat (also Ctrl-D, or Ctrl-C at the prompt twice)
Ctrl-C while the model answers stops the answer (what it wrote so far stays in the conversation)"""


def cmd_chat(args) -> None:
    model = _load(args)
    engine = model.engine
    sampling = _sampling(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    pending_images = list(args.image)
    engine.warmup()
    print(f"{model.name}: chat ({engine.backend_name} on {engine.device}). /help for the commands")
    interrupted = False  # Ctrl-C at the prompt once: a second one ends the chat
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            if interrupted:
                print()
                return
            interrupted = True
            print("\n(Ctrl-C again or Ctrl-D to quit)")
            continue
        interrupted = False
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/help":
            print(CHAT_HELP)
            continue
        if text == "/reset":
            history, pending_images = history[:1] if args.system else [], []
            continue
        if text.startswith("/image "):
            pending_images.append(text.split(maxsplit=1)[1])
            continue
        try:
            message = model.user(text, pending_images)
        except LmbundleError as exc:  # a bad image: said once, then forgotten
            pending_images = []
            print(f"error: {exc}", file=sys.stderr)
            continue
        pending_images = []
        history.append(message)
        reply = []
        stream = model.stream_chat(history, **sampling)
        try:
            for piece in stream:
                reply.append(piece)
                print(piece, end="", flush=True)
            print()
        except KeyboardInterrupt:  # stop this answer, keep the chat
            stream.close()
            print("\n(stopped)")
        except LmbundleError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args) -> None:
    from .engine.bench import bench, format_bench

    chunked = args.prefill == "chunked"
    result = bench(_load(args).engine, args.prompt_tokens, args.gen_tokens, args.trials,
                   prefill_chunk=args.chunk if chunked else 0, chunked_prefill=0 if chunked else args.chunk)
    print(json.dumps(result) if args.json else format_bench(result))


def cmd_gate(args) -> None:
    if args.server:
        return _gate_server(args)
    if not args.bundle:
        raise LmbundleError("gate needs a bundle folder, or --server URL")
    from .engine.engine import Engine
    from .gates.gate import run_gate, verdict
    from .gates.oracle import Oracle

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log = None if args.quiet else progress
    engine = Engine(args.bundle, backend=args.backend, device=args.device)
    against = Engine(args.against, backend=args.backend, device=args.device) if args.against else None
    _check_oracle_architecture(engine, args.oracle)
    oracle = Oracle(args.oracle)
    report = run_gate(engine, oracle, against, coverage=args.coverage, log=log)
    image = None
    if engine.is_vlm:
        from .gates.image_gate import run_image_gate

        image = run_image_gate(engine, oracle, log=log)
    line = verdict(report, image)
    if args.json:
        print(json.dumps(report.to_dict() | ({"image": image.to_dict()} if image else {})
                         | {"passed": line == "PASS", "verdict": line}))
    else:
        print("\n".join(report.lines() + (image.lines() if image else []) + [line]))
    if line != "PASS":
        del engine, against  # a Core AI engine is freed now, not during interpreter exit (see `main`)
        gc.collect()
        raise SystemExit(1)


def _check_oracle_architecture(engine, oracle: str) -> None:
    """The oracle must be a checkpoint of the bundle's architecture (else the gate has nothing to compare)."""
    from .convert.checkpoint import open_checkpoint

    theirs, ours = open_checkpoint(oracle).architecture.name, engine.bundle.info["architecture"]
    if theirs != ours:
        raise LmbundleError(f"--oracle {oracle}: a {theirs} checkpoint, but the bundle is {ours} "
                            f"(pass the checkpoint {engine.name} was converted from)")


def _gate_server(args) -> None:
    from .gates.gate import verdict
    from .gates.oracle import Oracle
    from .gates.server_client import Server
    from .gates.server_gate import run_server_gate

    if args.bundle or args.against or args.coverage:
        raise LmbundleError("gate --server takes no bundle, --against or --coverage")
    server = Server(args.server, args.model, args.api_key)
    server.connect()
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    progress(f"gate --server {server.base}: model {server.model!r}")
    report = run_server_gate(server, Oracle(args.oracle), args.precision, progress=progress)
    line = verdict(report)
    if args.json:
        print(json.dumps(report.to_dict() | {"verdict": line}))
    else:
        print("\n".join(report.lines() + [line]))
    if line != "PASS":
        raise SystemExit(1)


def cmd_serve(args) -> None:
    from .engine.prefix_cache import parse_size

    _chunk(args)
    try:
        from .serve.app import options_from
        from .serve.server import serve
    except ModuleNotFoundError as exc:  # a broken install: fastapi, uvicorn... are lmbundle's dependencies
        if (exc.name or "lmbundle").startswith("lmbundle"):
            raise
        raise LmbundleError(f"serve needs the module '{exc.name}', which is not installed "
                            f"(pip install lmbundle's dependencies)") from None
    options = options_from(args)
    try:
        cache_bytes = parse_size(args.cache_mem)
        host_bytes = None if args.cache_host_mem is None else parse_size(args.cache_host_mem)
    except ValueError as exc:
        raise LmbundleError(f"--cache-mem / --cache-host-mem: {exc}") from None
    model = _load(args, solo_step=not args.always_batched, cache_bytes=cache_bytes, cache_host_bytes=host_bytes,
                  max_batch=args.max_batch, token_budget=args.token_budget)
    model.engine.warmup()
    serve(model.engine, options)


COMMANDS = {"convert": cmd_convert, "run": cmd_run, "chat": cmd_chat, "bench": cmd_bench, "gate": cmd_gate,
            "serve": cmd_serve, "info": cmd_info}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet(args.verbose)
    try:
        COMMANDS[args.command](args)
        # A Core AI engine the command leaves in a reference cycle is freed now, while its event-loop
        # thread still runs: freed during interpreter exit, the runtime aborted ("C++ exception handling
        # detected...", exit status 134) in 3 of 4 runs.
        gc.collect()
    except LmbundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
