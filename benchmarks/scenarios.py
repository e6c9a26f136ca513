"""What each benchmark scenario asks, shared by the runner and the workers."""

from __future__ import annotations

from dataclasses import dataclass

SYSTEMS = ("edge", "handler", "cli")
SYSTEM_NAMES = {
    "edge": "edge-vlm",
    "handler": "llama-cpp-python MTMDChatHandler",
    "cli": "llama-mtmd-cli",
}

QUESTION = "Describe this image in detail."
TURNS = (
    "What is in this image?",
    "Which colours do you see?",
    "Is there any text in it?",
    "Describe the background.",
)
FOLLOW_UP_SYSTEM = "You are a careful assistant. Answer briefly."
FOLLOW_UP_QUESTION = "What shapes are in this image?"
TWO_IMAGES_QUESTION = "What differs between these two images?"
BATCH_PROMPTS = (
    "What shapes are in the image?",
    "How many shapes are there?",
    "Describe the image.",
)


@dataclass(frozen=True)
class Scenario:
    """One row group of the results.

    Attributes:
        key: Short id (``a`` ... ``e``, ``batch``, ``a-low`` ...).
        title: What it measures.
        systems: Systems that can run it (the others get n/a).
        detail: The ``image_url.detail`` edge-vlm sends (anchors have no such knob).
    """

    key: str
    title: str
    systems: tuple[str, ...]
    detail: str = "high"


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("a", "512x512 PNG, one question", SYSTEMS),
    Scenario("b", "4032x3024 JPEG, one question", SYSTEMS),
    Scenario("c", "same image, 4-turn conversation (TTFT of turns 2-4)", ("edge", "handler")),
    Scenario("d", "new conversation about an image seen before", ("edge", "handler")),
    Scenario("e", "two 512x512 PNGs in one message", SYSTEMS),
    Scenario("batch", "N images x 3 prompts", ("edge", "handler")),
    # Issue 9: edge-vlm's detail levels against the anchors' defaults (their a and b rows).
    Scenario("a-low", "512x512 PNG, detail=low", ("edge",), "low"),
    Scenario("a-auto", "512x512 PNG, detail=auto (edge-vlm's default)", ("edge",), "auto"),
    Scenario("b-low", "4032x3024 JPEG, detail=low", ("edge",), "low"),
    Scenario("b-auto", "4032x3024 JPEG, detail=auto (edge-vlm's default)", ("edge",), "auto"),
    # Issue 17: coming back to a conversation the live KV cache no longer holds.
    Scenario("d-sys", "new conversation, same system prompt and image, after another one",
             ("edge", "handler")),
    Scenario("alt", "two conversations alternating turns (slowest follow-up TTFT)",
             ("edge", "handler")),
)}
