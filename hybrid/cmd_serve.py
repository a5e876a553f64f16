"""`hybrid serve`: the OpenAI- and Ollama-compatible HTTP server (waitress), see docs/api.md.

The server listens at once and answers /health with 503 while the model loads in a
background thread; then it starts the engine and answers 200.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time

HELP = "serve the model over HTTP: OpenAI /v1/chat/completions, /v1/completions and Ollama /api/*"
log = logging.getLogger("hybrid.serve")


def add_parser(subparsers):
    from .defaults import add_model_args

    p = subparsers.add_parser("serve", help=HELP, description=HELP + ". See docs/api.md.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HYBRID_API_KEY; unset = no key)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the file name)")
    p.add_argument("--strict-model-name", action="store_true",
                   help="answer 404 model_not_found to requests naming another model (default: serve any name)")
    p.add_argument("--slots", type=int, default=4, help="requests generated together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before 429 (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int,
                   help="max_tokens for requests that set none (default: fill the context)")
    p.add_argument("--threads", type=int, default=16, help="HTTP worker threads (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=8, help="largest request body (default: %(default)s MB)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import waitress

    from .server import create_app

    if args.slots < 1 or args.max_queue < 1 or args.threads < 1:
        print("--slots, --max-queue and --threads must be >= 1", file=sys.stderr)
        return 2
    app = create_app(None, api_key=args.api_key, served_model_name=args.served_model_name,
                     strict_model_names=args.strict_model_name, ctx=args.ctx,
                     default_max_tokens=args.default_max_tokens,
                     max_body=int(args.max_body_mb * 1024 * 1024))
    # channel_request_lookahead keeps a busy connection readable, so a client that hangs up
    # mid-stream is noticed (and its generation cancelled) within a token or two.
    server = waitress.create_server(app, host=args.host, port=args.port, threads=args.threads,
                                    channel_request_lookahead=1, ident="hybrid")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{server.effective_port}"
    print(f"hybrid serve: listening on {url}, loading the model...", flush=True)
    loaded = {}
    threading.Thread(target=_load, args=(app, args, url, loaded), name="hybrid-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if "engine" in loaded:
            loaded["engine"].stop()
    return loaded.get("status", 0)


def _load(app, args, url: str, loaded: dict) -> None:
    """Load the model and start the engine; on failure say why and stop the server (status 2
    for bad input, as the other commands, 1 for anything else)."""
    from .defaults import load_from_args
    from .engine import Engine

    state = app.extensions["hybrid"]
    t0 = time.perf_counter()
    try:
        model = load_from_args(args)
        model.warm_up()
        engine = Engine(model, slots=args.slots, ctx=args.ctx, max_queue=args.max_queue).start()
        loaded["engine"] = engine
        be = state.attach(engine)
    except Exception as e:
        if isinstance(e, (ValueError, OSError)):   # bad input (path, rule file, --ctx): one line, status 2
            loaded["status"] = 2
        else:
            log.exception("could not load the model")
            loaded["status"] = 1
        state.fail(f"{type(e).__name__}: {e}")
        print(f"hybrid serve: could not load the model: {e}", file=sys.stderr, flush=True)
        _thread.interrupt_main()
        return
    print(f"hybrid serve: ready at {url} (model {be.name!r}, ctx {be.ctx}, {args.slots} slots, "
          f"loaded in {time.perf_counter() - t0:.1f}s)", flush=True)

