"""Images of a server request: read under the server's own policy, before any model work.

The server's policy is stricter than the CLI's: ``data:`` URLs always; ``http(s)`` only
with remote images on (and then through :mod:`edge_vlm.netfetch`: public addresses only
unless allowlisted, pinned connections, redirects re-checked, a timeout and a byte cap);
local paths and ``file://`` only under ``server.allowed_local_media_path``.

Every image is read here, once, and its bytes handed to the runtime as they are
(:meth:`edge_vlm.api.VLM.answer_read`), so the runtime never opens a path or a URL a
client named, and nothing is encoded or decoded twice. The SHA-256 of the bytes is the
image's content identity in response-cache keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.config import Settings
from edge_vlm.image_source import ImagePolicy, read_image_source
from edge_vlm.schema import ChatCompletionRequest, ImagePart


def server_image_policy(settings: Settings) -> ImagePolicy:
    """The image policy of ``edge-vlm serve``, from the image and server settings."""
    media_root = settings.server.allowed_local_media_path
    return ImagePolicy.from_settings(
        settings.images,
        allow_local_files=media_root is not None,
        allowed_local_roots=(Path(media_root).expanduser(),) if media_root else (),
    )


@dataclass(frozen=True)
class ReadImages:
    """The images of a request, read once, and their content identities.

    Attributes:
        data: Each image part's encoded bytes, in order (handed to the runtime as they are).
        identities: ``sha256:<hex>`` of each image's bytes, in order.
    """

    data: list[bytes]
    identities: list[str]


def read_images(request: ChatCompletionRequest, policy: ImagePolicy) -> ReadImages:
    """Read every image of a request under ``policy``.

    Raises:
        ImageError: an image is refused, unreadable or too large (naming its field).
    """
    data: list[bytes] = []
    for i, msg in enumerate(request.messages):
        if not isinstance(msg.content, list):
            continue
        for j, part in enumerate(msg.content):
            if isinstance(part, ImagePart):
                field = f"messages[{i}].content[{j}].image_url.url"
                data.append(read_image_source(part.image_url.url, policy, field)[0])
    return ReadImages(data, ["sha256:" + hashlib.sha256(d).hexdigest() for d in data])
