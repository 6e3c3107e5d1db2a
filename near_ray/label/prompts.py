"""What the MLLM is asked: versioned prompt texts, the answer's JSON schema and per-sample seeds.

A prompt version is part of every label's identity (``prompt_version`` column): changing a text
means a new version, so answers to different questions are never mixed or mistaken for done.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from near_ray.errors import NearRayError


class PromptError(NearRayError):
    """An unknown prompt version; the message lists the known ones."""


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    user_with_meta: str  # formatted with {meta_class}
    user_generic: str  # when the domain's meta-class is unknown


# vLLM's LLaVA chat templates need a text system message (ray issue #56125), so every version has one.
PROMPTS: dict[str, PromptTemplate] = {
    "v1": PromptTemplate(
        system="You are an expert in fine-grained visual recognition. You name what an image shows as "
        "specifically as you can.",
        user_with_meta="What is the most specific name of this {meta_class}? Answer with the name only.",
        user_generic="What is the most specific name of the main object in this image? Answer with the name only.",
    ),
}

# Structured output: the answer is a JSON object with one string field.
LABEL_SCHEMA: dict = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


def prompt_for(meta_class: str | None, version: str) -> tuple[str, str]:
    """(system prompt, user prompt) for a domain whose meta-class may be unknown."""
    if version not in PROMPTS:
        raise PromptError(f"label.prompt_version: unknown prompt version '{version}' (known: {sorted(PROMPTS)})")
    t = PROMPTS[version]
    meta = (meta_class or "").strip()
    user = t.user_with_meta.format(meta_class=meta) if meta else t.user_generic
    return t.system, user


def schema_text(structured: bool) -> str:
    """The JSON schema as a string for the ``json_schema`` column ("" = free-text answers)."""
    return json.dumps(LABEL_SCHEMA, sort_keys=True) if structured else ""


def chat_messages(system: str, user: str, image: bytes, mime: str, system_message: bool = True) -> list[dict]:
    """The chat messages of one labeling request, for every backend: a text system message (ray issue
    #56125) and a user message with the image as a ``data:`` URL part and the question. Every message's
    content is a list of parts, so the column has one Arrow type in Ray Data. Without ``system_message``
    (a chat template that rejects the system role) the system text opens the question instead."""
    data_url = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
    question = user if system_message else f"{system}\n\n{user}"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}],
        },
    ]
    if system_message:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


def sample_seed(base_seed: int, image_id: str, sample: int) -> int:
    """A stable 31-bit seed per (run seed, image, sample): re-runs ask exactly the same question."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
