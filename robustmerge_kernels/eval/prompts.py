"""The LLaVA-v1.5 conversation template (``conv_vicuna_v1`` in LLaVA's conversation.py).

``SeparatorStyle.TWO`` with sep " " and sep2 "</s>": the system prompt, then
"USER: <image>\\n{question} ASSISTANT:". The model's answer ends with "</s>" (the EOS
token), where generation stops.
"""

from __future__ import annotations

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"
TEMPLATES = {"vicuna_v1": (VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")}


def build_question(text: str, mode: str = "full", suffix: str = "") -> str:
    """The user's question as the RobustMerge eval scripts build it from a question's
    ``text``: whole (``full``), or only its first line followed by the task's suffix
    (``first_line``, model_vqa_cc_imagenet.py); ``suffix`` is appended either way."""
    if mode == "first_line":
        text = text.split("\n")[0]
    elif mode != "full":
        raise ValueError(f"unknown text mode {mode!r} (full or first_line)")
    return text + suffix


def build_prompt(question: str, conv_mode: str = "vicuna_v1", with_image: bool = True) -> str:
    """The full prompt: "<system> USER: <image>\\n<question> ASSISTANT:"."""
    try:
        system, (user, assistant), sep, _ = TEMPLATES[conv_mode]
    except KeyError:
        raise ValueError(f"unknown conversation mode {conv_mode!r} (have: {', '.join(TEMPLATES)})") from None
    if with_image:
        question = f"{IMAGE_TOKEN}\n{question}"
    return f"{system}{sep}{user}: {question}{sep}{assistant}:"
