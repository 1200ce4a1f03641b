"""`fluxrt serve`: the command-line face of the service (the parser is plain argparse; FastAPI loads on use).

fluxrt serve [--host 127.0.0.1] [--port 8000] [--data-dir fluxrt-data] [--token-file FILE] [--model M] ...
fluxrt serve --text-encoder-only --port 8001          # prompt embeddings for `--text-encoder-url`
"""

from __future__ import annotations

import argparse
import os
import sys

SERVE_EXAMPLES = """\
examples:
  fluxrt serve                                              # the embedded model on http://127.0.0.1:8000, no auth
  python -c "import secrets; print(secrets.token_urlsafe(32))" > tokens.txt
  fluxrt serve --host 0.0.0.0 --port 8000 --token-file tokens.txt --data-dir /var/lib/fluxrt
  fluxrt serve --model flux.2-dev --device cuda --token-file tokens.txt --queue-size 32 --max-batch 4
  fluxrt serve --cache 0.2                                  # lossy: the step cache on every job
  fluxrt serve --text-encoder-only --model flux.2-dev --device cuda --port 8001 --token-file tokens.txt
"""


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible and native job API)",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                   "tokens)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-dir", default="fluxrt-data", metavar="DIR", help="job database, references and results "
                   "(default ./fluxrt-data); one server per data dir")  # fmt: skip
    p.add_argument("--token-file", metavar="FILE", help="bearer tokens, one per line (also $FLUXRT_TOKENS, comma "
                   "separated); without any, auth is off and only a loopback --host is allowed")  # fmt: skip
    p.add_argument("--model", help="preset name, local file/folder or cached repo id (default: fluxrt-shapes)")
    p.add_argument("--device", help="device of every component (default: cuda if any, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="compute dtype (default: bf16 on GPU, fp32 "
                   "on CPU)")  # fmt: skip
    from ..cli import threshold_arg

    p.add_argument("--cache", type=threshold_arg, metavar="THRESHOLD", help="step cache for every job (lossy, off "
                   "by default; as for fluxrt generate --cache); results record it")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=16, metavar="N", help="unfinished jobs accepted before 429 "
                   "(default 16)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=4, metavar="N", help="images per batch of compatible jobs")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="default run-time limit of a job in "
                   "seconds (default 600; a request may ask for up to --max-timeout)")  # fmt: skip
    p.add_argument("--max-timeout", type=float, default=3600.0, metavar="S", help="largest timeout a request may ask")
    p.add_argument("--max-side", type=int, default=2048, metavar="PX", help="largest output width/height")
    p.add_argument("--max-steps", type=int, default=100, metavar="N", help="most denoising steps a request may ask")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="most images per request")
    p.add_argument("--max-upload-mb", type=float, default=64.0, metavar="MB", help="largest request body")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N", help="largest uploaded image, in "
                   "pixels (checked from the header, before decoding)")  # fmt: skip
    p.add_argument("--no-previews", action="store_true", help="no latent previews in the event stream")
    p.add_argument("--safety", choices=("default", "filters-off"), default="default",
                   help="the model's safety policy, as for fluxrt generate")  # fmt: skip
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a token")
    p.add_argument("--text-encoder-only", action="store_true", help="serve prompt embeddings only "
                   "(POST /v1/text/embeddings), for fluxrt generate --text-encoder-url")  # fmt: skip
    p.add_argument("--c2pa-cert", metavar="PEM", help="certificate chain that signs a C2PA manifest into every result "
                   "(also $FLUXRT_C2PA_CERT; with --c2pa-key)")
    p.add_argument("--c2pa-key", metavar="PEM", help="the signer's private key (also $FLUXRT_C2PA_KEY)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def config_from_args(args):
    import dataclasses

    from ..request import Limits
    from .config import ServiceConfig, ServiceLimits, load_tokens

    dtype = None
    if args.dtype:
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    request_limits = dataclasses.replace(Limits(), max_side=args.max_side, max_steps=args.max_steps,
                                         max_images=args.max_images)  # fmt: skip
    limits = ServiceLimits(max_body_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                           request=request_limits)  # fmt: skip
    return ServiceConfig(data_dir=args.data_dir, tokens=load_tokens(args.token_file), host=args.host,
                         model=args.model, device=args.device, dtype=dtype, step_cache=args.cache, limits=limits,
                         queue_size=args.queue_size, max_batch=args.max_batch, job_timeout_s=args.timeout,
                         max_job_timeout_s=args.max_timeout, previews=not args.no_previews, safety=args.safety,
                         text_encoder_only=args.text_encoder_only, public_metrics=args.public_metrics,
                         c2pa_cert=args.c2pa_cert or os.environ.get("FLUXRT_C2PA_CERT"),
                         c2pa_key=args.c2pa_key or os.environ.get("FLUXRT_C2PA_KEY"))  # fmt: skip


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"fluxrt: error: {e}; the server needs the serve extra: pip install 'fluxrt[serve]'", file=sys.stderr)
        return 1
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if not config.auth:
        logging.getLogger("fluxrt.service").warning("no tokens: auth is off (allowed on %s only)", args.host)
    try:
        app = create_app(config)
    except RuntimeError as e:  # the data dir is in use by another server
        print(f"fluxrt: error: {e}", file=sys.stderr)
        return 1
    # open event streams would hold a graceful shutdown forever: close them after 5 s; a running batch then stops at
    # its next step and goes back to the queue (the lifespan shutdown), to resume at the next start
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
