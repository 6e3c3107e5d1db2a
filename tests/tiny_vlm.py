"""A tiny, randomly initialized LLaVA that vLLM can load on CPU, built locally in a few seconds.

No model hub is reachable on development machines, so the vLLM tests build their own model: a CLIP
vision tower (hidden 64, 2 layers, 32 px images, 8 px patches) + a Llama (hidden 128, 2 layers,
2 heads of dim 64 — vLLM's CPU attention rejects smaller heads —, 1 KV head) and a 512-token
byte-level BPE trained here with `tokenizers`. Its answers are random text: tests assert plumbing
(rows, statuses, token counts), never names.

Runs in the vLLM environment (it needs transformers):  python tests/tiny_vlm.py OUT_DIR [--llava-hf-template]
(the second template has the shape of llava-hf's, which needs list-of-parts message content).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
VOCAB_SIZE = 512
IMAGE_SIZE = 32
PATCH_SIZE = 8

# Every non-text part renders as the image token: vLLM then finds exactly one placeholder per image
# ("Failed to apply prompt replacement" otherwise), whatever content format the caller used.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}SYSTEM: {% elif message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}" + IMAGE_TOKEN + "{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The shape of llava-hf's published templates (llava-1.5-*-hf): images first, then text, each picked out
# of a list of parts with `selectattr`. Given string content it renders neither: vLLM must be asked for
# the "openai" content format.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The shape of Mistral's and llava-v1.6-mistral's templates: any role but user and assistant raises, so a
# request with a system message fails in ray.data.llm's chat-template stage (the job, not the row).
NO_SYSTEM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}"
    + IMAGE_TOKEN + "{% endif %}{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

_CORPUS = """
What is the most specific name of this bird? Answer with a JSON object {"name": "..."}.
Tennessee Warbler, Orange-crowned Warbler, Blue Jay, Northern Cardinal, American Robin, House Sparrow,
common daisy, red rose, sunflower, tulip, lily of the valley, a photo of a bird, a flower, a leaf.
You name fine-grained categories of images. The image shows a species; answer with its name only.
abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'"()[]{}-_/
"""


def build_tokenizer(out: Path, chat_template: str = CHAT_TEMPLATE):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = chat_template
    return fast


def build_config(tokenizer):  # -> transformers.LlavaConfig
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _rename_vision_keys(out: Path) -> None:
    """vLLM's LLaVA loader expects the CLIP tower under ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    for shard in out.glob("*.safetensors"):
        tensors = load_file(str(shard))
        renamed = {}
        for key, value in tensors.items():
            head, sep, tail = key.partition("vision_tower.")
            if sep and not tail.startswith("vision_model."):
                key = f"{head}vision_tower.vision_model.{tail}"
            renamed[key] = value.contiguous()
        save_file(renamed, str(shard), metadata={"format": "pt"})


def build_tiny_vlm(out: str | Path, seed: int = 0, chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write a loadable tiny LLaVA (weights, config, tokenizer, processor, chat template) to ``out``."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out, chat_template)
    config = build_config(tokenizer)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    _rename_vision_keys(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=chat_template,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "near_ray_tiny_vlm.json").write_text(json.dumps({"random_weights": True, "seed": seed}))
    return out


if __name__ == "__main__":
    flags = {"--llava-hf-template": LLAVA_HF_CHAT_TEMPLATE, "--no-system-template": NO_SYSTEM_CHAT_TEMPLATE}
    args = [a for a in sys.argv[1:] if a not in flags]
    if len(args) != 1:
        sys.exit("usage: python tests/tiny_vlm.py OUT_DIR [--llava-hf-template | --no-system-template]")
    template = next((flags[a] for a in sys.argv[1:] if a in flags), CHAT_TEMPLATE)
    print(build_tiny_vlm(args[0], chat_template=template))
