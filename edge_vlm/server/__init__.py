"""``edge-vlm serve``: the chat-completion API (OpenAI / Hugging Face) on the user's machine.

An ASGI application (Starlette) served by uvicorn on h11; :func:`create_app` gives the app
to mount in your own Starlette or FastAPI application. The parts, one job per module:

- :mod:`.app`: the ASGI app, the Host/Origin guard, errors, the request log;
- :mod:`.handlers`: the endpoints; :mod:`.answer`: running one answer and streaming it;
- :mod:`.hfraw`, :mod:`.responses_api`: the HF text-generation form, the Responses API;
- :mod:`.body`: reading a body under limits; :mod:`.limits`: what a request may ask for;
- :mod:`.models`: which models are loaded, loading state, the per-model queue;
- :mod:`.auth`, :mod:`.media`, :mod:`.cache`, :mod:`.turnstile`, :mod:`.protocol`;
- :mod:`.run`: uvicorn, the command's start and stop.

Nothing heavy is imported here: ``edge_vlm.server.cli`` is imported for ``edge-vlm --help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.config import Settings
    from edge_vlm.server.app import ServerApp


def create_app(settings: Settings, **kwargs: Any) -> ServerApp:
    """edge-vlm's API as an ASGI app; see :func:`edge_vlm.server.app.create_app`."""
    from edge_vlm.server.app import create_app as create

    return create(settings, **kwargs)


__all__ = ["create_app"]
