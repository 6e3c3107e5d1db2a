"""How vLLM hands chat messages to a model's chat template: as a list of parts, or as one string.

ray.data.llm's multimodal stage parses the messages with vLLM's ``parse_chat_messages`` in one of two
content formats, then the chat-template stage renders them with the model's HF template:

- ``"openai"``: content stays a list of parts (``{"type": "image"}``, ``{"type": "text", …}``). Templates
  that loop over ``message['content']`` (llava-hf, Qwen2/2.5/3-VL, Gemma 3, Idefics/SmolVLM, Llama 3.2
  Vision, InternVL-hf, …) need it; given a string they iterate its characters and drop the image and
  the question (a llava-hf prompt renders as ``"USER: ASSISTANT:"``).
- ``"string"``: content is text with the model's image placeholder inlined. Templates that print
  ``message['content']`` as text (Phi-3.5-vision, MiniCPM-V, OpenGVLab's own InternVL) need it.

Ray's default is ``"string"``. vLLM's server detects the format from the template's Jinja AST; the
same rule is applied here to a local model's template (a loop over a message's content means
``"openai"``), and by model family where the template is not on this machine (an HF id, ``s3://``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from near_ray.config import VLLMBackendConfig

ContentFormat = Literal["string", "openai"]
# Families whose published chat template raises on a system message (llava-v1.6-mistral, Mistral's own
# instruct templates: "Only user and assistant roles are supported!"; Gemma 2 / PaliGemma: "System role
# not supported"), for a model whose template is not on this machine.
_NO_SYSTEM_ROLE = ("llava-v1.6-mistral", "mistral-7b-instruct", "gemma-2", "paligemma")

_FOR = re.compile(r"\{%[-+]?\s*for\s+(\w+)(?:\s*,\s*\w+)?\s+in\s+(.+?)\s*[-+]?%\}", re.S)
_SET = re.compile(r"\{%[-+]?\s*set\s+(\w+)\s*=\s*(.+?)\s*[-+]?%\}", re.S)
# Where transformers keeps a model's chat template, the processor's (which ray.data.llm renders with) first.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


def _starts_with(expr: str, names: set[str]) -> bool:
    expr = expr.lstrip("( ")
    return any(re.match(rf"{re.escape(n)}(?![\w])", expr) for n in names)


def template_content_format(template: str) -> ContentFormat:
    """``"openai"`` when the template loops over a message's content, else ``"string"`` (vLLM's rule)."""
    loops = _FOR.findall(template)
    collections = {"messages"}
    while True:  # names assigned from the messages (``set loop_messages = messages[1:]``) hold messages too
        more = {name for name, rhs in _SET.findall(template) if _starts_with(rhs, collections)} - collections
        if not more:
            break
        collections |= more
    message_vars = {target for target, it in loops if _starts_with(it, collections)}
    for _, it in loops:
        it = it.strip().lstrip("( ")
        if it == "content" or re.match(r"content\s*[|)]", it):
            return "openai"
        for m in message_vars:
            if re.match(rf"{re.escape(m)}\s*(\[\s*['\"]content['\"]\s*\]|\.content\b)", it):
                return "openai"
    return "string"


def local_chat_template(model_source: str) -> str | None:
    """The chat template of a model folder on this machine, or None."""
    folder = Path(model_source)
    if "://" in model_source or not folder.is_dir():
        return None
    for name in _TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text()
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, list):  # tokenizer_config: [{"name": "default", "template": …}, …]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def family_content_format(model_source: str) -> ContentFormat:
    """The content format of a model family's published chat template, from the model's name."""
    name = model_source.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.startswith(("phi-3", "phi-4-multimodal")) or name.startswith("minicpm-"):
        return "string"
    if "internvl" in name and not name.endswith("-hf"):  # OpenGVLab's remote-code InternVL; the -hf ones loop
        return "string"
    return "openai"


def chat_content_format(v: VLLMBackendConfig) -> ContentFormat:
    """The content format the label stage asks ray.data.llm for (``label.backend.chat_template_content_format``)."""
    if v.chat_template_content_format != "auto":
        return v.chat_template_content_format
    if (template := local_chat_template(v.model_source)) is not None:
        return template_content_format(template)
    return family_content_format(v.model_source)


def _render(template: str, messages: list[dict]) -> str:
    """Render a chat template the way transformers does (a sandbox, ``raise_exception`` defined)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token="")


def template_accepts_system(template: str) -> bool | None:
    """Whether a chat template renders a conversation that opens with a system message.

    None when it renders neither that nor the same conversation without one (the check cannot tell).
    """
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    system = {"role": "system", "content": [{"type": "text", "text": "You name things."}]}
    try:
        _render(template, [user])
    except Exception:
        return None
    try:
        _render(template, [system, user])
    except Exception:
        return False
    return True


def system_message(v: VLLMBackendConfig) -> bool:
    """Whether labeling requests carry a separate system message (``label.backend.system_prompt``).

    ``auto``: yes unless the model's chat template (a local folder's) raises on one, or, where the
    template is not on this machine, the model's family is known to; then the system text opens the
    user's question instead, because ray.data.llm's chat-template stage fails the whole job, not the row.
    """
    if v.system_prompt != "auto":
        return v.system_prompt == "message"
    if (template := local_chat_template(v.model_source)) is not None:
        return template_accepts_system(template) is not False
    name = v.model_source.rstrip("/").rsplit("/", 1)[-1].lower()
    return not any(family in name for family in _NO_SYSTEM_ROLE)
