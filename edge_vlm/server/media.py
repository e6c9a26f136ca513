"""Images of a server request: read under the server's own policy, before any model work.

The server's policy is stricter than the CLI's: ``data:`` URLs always; ``http(s)`` only
with remote images on (and then through :mod:`edge_vlm.netfetch`: public addresses only
unless allowlisted, pinned connections, redirects re-checked, a timeout and a byte cap);
local paths and ``file://`` only under ``server.allowed_local_media_path``.

Every image is read here, once, and handed to the model as a ``data:`` URL of the bytes
read, so the runtime never opens a path or a URL a client named. The SHA-256 of the bytes
is the image's content identity in response-cache keys.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.config import Settings
from edge_vlm.images import ImagePolicy, read_image_source, sniff_format
from edge_vlm.schema import ChatCompletionRequest, ImagePart

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
         "BMP": "image/bmp"}


def server_image_policy(settings: Settings) -> ImagePolicy:
    """The image policy of ``edge-vlm serve``, from the image and server settings."""
    media_root = settings.server.allowed_local_media_path
    return ImagePolicy(
        allow_local_files=media_root is not None,
        allowed_local_roots=(Path(media_root).expanduser(),) if media_root else (),
        allow_remote=settings.images.allow_remote,
        allowed_hosts=tuple(settings.images.allowed_hosts),
        max_bytes=settings.images.max_bytes,
        max_pixels=settings.images.max_pixels,
    )


@dataclass(frozen=True)
class PreparedRequest:
    """A request whose images are all inline, with their content identities.

    Attributes:
        request: A copy of the request; every ``image_url.url`` is a ``data:`` URL.
        identities: ``sha256:<hex>`` of each image's bytes, in order.
    """

    request: ChatCompletionRequest
    identities: list[str]


def prepare_images(request: ChatCompletionRequest, policy: ImagePolicy) -> PreparedRequest:
    """Read every image of a request under ``policy`` and inline it.

    Raises:
        ImageError: an image is refused, unreadable or too large (naming its field).
    """
    copy = request.model_copy(deep=True)
    identities: list[str] = []
    for i, msg in enumerate(copy.messages):
        if not isinstance(msg.content, list):
            continue
        for j, part in enumerate(msg.content):
            if not isinstance(part, ImagePart):
                continue
            field = f"messages[{i}].content[{j}].image_url.url"
            url = part.image_url.url
            data, _ = read_image_source(url, policy, field)
            identities.append("sha256:" + hashlib.sha256(data).hexdigest())
            if url.lstrip()[:5].lower() != "data:":
                mime = _MIME.get(sniff_format(data), "")
                part.image_url.url = f"data:{mime};base64," + base64.b64encode(data).decode()
    return PreparedRequest(copy, identities)
