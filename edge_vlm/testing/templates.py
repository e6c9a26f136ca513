"""Chat templates with the structure and special tokens of each family's real template.

Written for edge-vlm (not copied): each handles string content and typed content parts
(``{"type": "text"}`` / ``{"type": "image"}``) as the originals do. Newlines are written
inside Jinja string literals so the output does not depend on ``trim_blocks``.
"""

from __future__ import annotations

# edge-vlm's own generic tiny model (the project's test fixture): <|role|>...<|end|>.
GENERIC = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)


def _content(image: str) -> str:
    return _CONTENT.replace("{{ IMAGE }}", "{{ '" + image + "' }}")


# SmolVLM-Instruct (Idefics3): "User:<image>Question<end_of_utterance>\nAssistant:".
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}"
    "{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    + _content("<image>")
    + "{{ '<end_of_utterance>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# LLaVA-1.5: "USER: <image>\nQuestion ASSISTANT: answer</s>".
LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + _content("") + "{{ ' ' }}"
    "{% else %}{{ message['role'] | upper }}{{ ': ' }}"
    + _content("<image>\\n")
    + "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL / Qwen2.5-VL: ChatML with a default system message; an image is
# <|vision_start|><|image_pad|><|vision_end|>.
QWEN25_VL = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content("<|vision_start|><|image_pad|><|vision_end|>")
    + "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3-VL Instruct: ChatML, no default system message.
QWEN3_VL = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content("<|vision_start|><|image_pad|><|vision_end|>")
    + "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma 3: the system message is folded into the first user turn; "model" is the
# assistant's role; an image is <start_of_image>.
GEMMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}"
    "{% endif %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# InternVL 3: ChatML with a default system message; an image is <image>.
INTERNVL = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are InternVL, a multimodal large language model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content("<image>\\n")
    + "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LFM2-VL: BOS, then ChatML; an image is <image>.
LFM2_VL = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content("<image>")
    + "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pixtral / Mistral: [INST]...[/INST]answer</s>; an image is [IMG].
PIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' }}" + _content("") + "{{ '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' }}"
    + _content("[IMG]")
    + "{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    + _content("")
    + "{{ eos_token }}{% endif %}{% endfor %}"
)

# moondream2: "<image>\n\nQuestion: ...\n\nAnswer:" (no chat tokens of its own).
MOONDREAM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nQuestion: ' }}" + _content("<image>")
    + "{% elif message['role'] == 'assistant' %}{{ '\n\nAnswer: ' }}" + _content("")
    + "{% else %}" + _content("") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAnswer:' }}{% endif %}"
)
