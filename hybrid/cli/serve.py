"""`hybrid serve`: the OpenAI- and Ollama-compatible HTTP server (waitress), see docs/api.md.

The server listens at once and answers /health with 503 while the model loads in a
background thread; then it starts the engine and answers 200. SIGTERM or Ctrl-C drains
it: no new connections or generations, in-flight requests finish (up to
--shutdown-timeout, then they end as cut short: finish_reason "length" and, for streams,
the final chunk and [DONE]), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

HELP = "serve the model over HTTP: OpenAI /v1/chat/completions, /v1/completions and Ollama /api/*"
log = logging.getLogger("hybrid.serve")
LIGHT_THREADS = 8      # HTTP threads kept for /health, /metrics and quick answers: never behind generations


def _int_in(lo: int, hi: int | None = None, what: str = "a number"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{what} must be {span}, got {v}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return v


def add_parser(subparsers):
    from hybrid.cli.defaults import add_model_args, add_prefix_cache_arg, add_start_arg

    p = subparsers.add_parser("serve", help=HELP, description=HELP + ". See docs/api.md.")
    add_model_args(p)
    add_start_arg(p)
    add_prefix_cache_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_int_in(0, 65535, "the port"), default=8000,
                   help="port, 0-65535 (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HYBRID_API_KEY; unset = no key)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the file name)")
    p.add_argument("--strict-model-name", action="store_true",
                   help="answer 404 model_not_found to requests naming another model (default: serve any name)")
    p.add_argument("--slots", type=_int_in(1, 1024, "--slots"), default=4,
                   help="requests generated together (default: %(default)s)")
    p.add_argument("--max-queue", type=_int_in(1, 100_000, "--max-queue"), default=64,
                   help="generation requests waiting for a slot; beyond them new ones get 429 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=_int_in(1, what="--default-max-tokens"),
                   help="max_tokens for requests that set none (default: fill the context)")
    p.add_argument("--threads", type=_int_in(1, 10_000, "--threads"),
                   help=f"HTTP worker threads (default: slots + max-queue + {LIGHT_THREADS}: every "
                        f"admitted generation streams on its own thread, and {LIGHT_THREADS} stay for "
                        f"/health, /metrics and refusals)")
    p.add_argument("--max-body-mb", type=_positive_float, default=8,
                   help="largest request body (default: %(default)s MB)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=30, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long in-flight requests may finish before they are "
                        "ended (default: %(default)s)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import waitress

    from hybrid.server import create_app

    threads = args.threads or args.slots + args.max_queue + LIGHT_THREADS
    # Admitted generations each hold a thread while they stream; keep LIGHT_THREADS free
    # (or half, with very few threads) so /health never waits behind them.
    reserve = min(LIGHT_THREADS, threads // 2)
    app = create_app(None, api_key=args.api_key, served_model_name=args.served_model_name,
                     strict_model_names=args.strict_model_name, ctx=args.ctx,
                     default_max_tokens=args.default_max_tokens,
                     max_body=int(args.max_body_mb * 1024 * 1024),
                     max_inflight=max(1, min(args.slots + args.max_queue, threads - reserve)))
    # channel_request_lookahead keeps a busy connection readable, so a client that hangs up
    # is noticed (waitress.client_disconnected) and its generation cancelled.
    server = waitress.create_server(app, host=args.host, port=args.port, threads=threads,
                                    connection_limit=threads + 100, channel_request_lookahead=1,
                                    ident="hybrid")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{server.effective_port}"
    print(f"hybrid serve: listening on {url}, loading the model...", flush=True)
    stop = threading.Event()
    loaded = {}

    def on_signal(signum, frame):
        if stop.is_set():
            print(f"hybrid serve: {signal.Signals(signum).name} again; already shutting down", flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=server.run, name="hybrid-http", daemon=True)
    try:
        threading.Thread(target=_load, args=(app, args, url, loaded, stop), name="hybrid-load", daemon=True).start()
        http.start()
        while not stop.wait(0.5) and http.is_alive():
            pass
        if "status" not in loaded:
            _drain(server, app.extensions["hybrid"], loaded.get("engine"), args.shutdown_timeout)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return loaded.get("status", 0)


def _drain(server, state, engine, timeout: float) -> None:
    """Stop accepting, let in-flight generations finish up to `timeout` seconds, end the
    rest as cut short, wait for their last bytes to go out."""
    from waitress import wasyncore

    be = state.backend
    busy = be.inflight if be is not None else 0
    print(f"hybrid serve: shutting down: {busy} request(s) in flight, waiting up to {timeout:g}s", flush=True)
    if be is not None:
        be.draining = True
    server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))  # the listening socket
    t0 = time.monotonic()
    while be is not None and be.inflight and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    left = be.inflight if be is not None else 0
    if engine is not None:
        engine.stop(reason="length")    # what is still running ends now, its text so far kept
    t1 = time.monotonic()
    while be is not None and be.inflight and time.monotonic() - t1 < 5:
        time.sleep(0.02)
    _flush(server, deadline=time.monotonic() + 5)
    print(f"hybrid serve: stopped: {busy - left} request(s) finished, {left} ended at the timeout "
          f"({time.monotonic() - t0:.1f}s)", flush=True)


def _flush(server, deadline: float) -> None:
    """Wait until the connections' output buffers are sent (or `deadline`)."""
    from waitress.channel import HTTPChannel

    while time.monotonic() < deadline:
        channels = [c for c in list(server._map.values()) if isinstance(c, HTTPChannel)]
        if not any(c.total_outbufs_len or c.requests for c in channels if c.connected):
            return
        time.sleep(0.02)


def _load(app, args, url: str, loaded: dict, stop: threading.Event) -> None:
    """Load the model and start the engine; on failure say why and stop the server (status 2
    for bad input, as the other commands, 1 for anything else)."""
    from hybrid.cli.defaults import load_for_engine, prefix_cache_bytes
    from hybrid.engine.scheduler import Engine
    from hybrid.inject.progress import StatusLine
    from hybrid.inject.tiered import warm_up

    state = app.extensions["hybrid"]
    t0 = time.perf_counter()
    line = StatusLine(sys.stderr, "hybrid serve")   # stdout keeps listening / ready / shutdown
    state.progress.listen(line)
    try:
        model, tiers = load_for_engine(args, progress=state.progress)
        if tiers is None:
            warm_up(model, state.progress)  # every kernel path loaded from the cache before /health says ok
        engine = Engine(model, slots=args.slots, ctx=args.ctx, max_queue=args.max_queue,
                        prefix_cache=prefix_cache_bytes(args)).start()
        loaded["engine"] = engine
        if tiers is not None:
            state.tiers = tiers
            tiers.progress.listen(line)
            tiers.attach(engine)
        del model   # after a tiered start's swap nothing else keeps the torch tier's float32 weights
        be = state.attach(engine)
    except Exception as e:
        if isinstance(e, (ValueError, OSError)):   # bad input (path, rule file, --ctx): one line, status 2
            loaded["status"] = 2
        else:
            log.exception("could not load the model")
            loaded["status"] = 1
        state.fail(f"{type(e).__name__}: {e}")
        print(f"hybrid serve: could not load the model: {e}", file=sys.stderr, flush=True)
        stop.set()
        return
    line.close()
    print(f"hybrid serve: ready at {url} (model {be.name!r}, ctx {be.ctx}, {args.slots} slots, "
             f"loaded in {time.perf_counter() - t0:.1f}s)" + (f"; answering on torch while the kernels compile "
                                                             f"in the background (pid {tiers.process.pid})" if tiers else ""),
          flush=True)
