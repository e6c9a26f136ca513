"""``edge-vlm serve``: flags (argparse only, imported for ``--help``) and the command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parser(subparsers: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]
               ) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="serve the chat-completion API (OpenAI / Hugging Face clients) on this machine",
        description="Serve POST /v1/chat/completions (and the Hugging Face layouts "
                    "/models/{model}/v1/chat/completions and POST /models/{model}), "
                    "POST /v1/responses, GET /v1/models and GET /health. "
                    "Programs written for the Hugging Face Inference API or the OpenAI SDK "
                    "work offline by changing only their base URL.",
    )
    net = p.add_argument_group("network and auth")
    net.add_argument("--host", help="address to bind (default 127.0.0.1; any other address "
                                    "requires a token)")
    net.add_argument("--port", type=int, help="port (default 8080; 0 picks a free one)")
    net.add_argument("--token", help="Bearer token clients must send (visible in the process "
                                     "list: prefer EDGE_VLM_SERVER__TOKEN)")
    net.add_argument("--auth", action="store_true", default=None,
                     help="require a token even on loopback; without --token one is "
                          "generated once and stored in a file only you can read")
    net.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                     help="allow web pages from this origin (repeatable; default: CORS off)")
    img = p.add_argument_group("images")
    img.add_argument("--allow-remote-images", action="store_true", default=None,
                     help="fetch http(s) image URLs (public addresses only)")
    img.add_argument("--allow-host", action="append", metavar="HOST",
                     help="with --allow-remote-images: also fetch from this host even if it "
                          "is private or loopback (repeatable)")
    img.add_argument("--allowed-local-media-path", metavar="DIR",
                     help="accept file:// URLs and paths under this folder (default: refused)")
    lim = p.add_argument_group("capacity")
    lim.add_argument("--queue-size", type=int,
                     help="requests waiting per model before 503 (default 8)")
    lim.add_argument("--max-loaded-models", type=int,
                     help="models kept loaded at once (default 1)")
    lim.add_argument("--no-preload", dest="preload", action="store_false", default=None,
                     help="load the default model on the first request, not at start")
    add_model_flags(p)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model.default": args.model,
        "model.mmproj": args.mmproj,
        "runtime.n_ctx": args.n_ctx,
        "runtime.threads": args.threads,
        "runtime.gpu": args.gpu,
        "runtime.flash_attn": args.flash_attn,
        "runtime.verbose": args.verbose,
        "images.allow_remote": args.allow_remote_images,
        "images.allowed_hosts": args.allow_host,
        "server.host": args.host,
        "server.port": args.port,
        "server.token": args.token,
        "server.require_token": args.auth,
        "server.cors_origins": args.cors_origin,
        "server.allowed_local_media_path": args.allowed_local_media_path,
        "server.queue_size": args.queue_size,
        "server.max_loaded_models": args.max_loaded_models,
        "server.preload": args.preload,
    }


def main(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C or SIGTERM."""
    from edge_vlm.server.run import serve

    if args.allow_host and not args.allow_remote_images:
        from edge_vlm.errors import ConfigError

        raise ConfigError("--allow-host only matters with --allow-remote-images: add it to "
                          "fetch http(s) images at all")
    return serve(_overrides(args), token_source="--token" if args.token else "settings")
