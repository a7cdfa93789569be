"""The Qwen2-VL chat layout of a video question, split where the stream splits it.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>   <- prefix, in the first chunk
    <|video_pad|> x N                                                              <- the video, chunk by chunk
    <|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n                   <- suffix, at question time

That is the Instruct checkpoints' chat template. A checkpoint whose tokenizer has a chat template
gets its layout from the template itself (chat_layout renders it once around a placeholder), so a
base checkpoint or a changed template lays the prompt out as transformers' apply_chat_template does.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant."
VIDEO_TOKEN = "<|video_pad|>"
_QUESTION = "\x00question\x00"  # a placeholder no template writes itself


def video_prefix(system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"


def question_suffix(question: str) -> str:
    return f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class ChatLayout:
    prefix: str  # everything before the video tokens
    suffix: str  # everything after them, with _QUESTION where the question goes
    source: str  # "chat template" or "built-in Instruct layout"

    def question_suffix(self, question: str) -> str:
        return self.suffix.replace(_QUESTION, question)


def chat_layout(tokenizer: PreTrainedTokenizerBase, system: str = SYSTEM_PROMPT) -> ChatLayout:
    """The layout of one video question: from the tokenizer's chat template when it has one, else the
    built-in Instruct layout above."""
    if not getattr(tokenizer, "chat_template", None):
        return ChatLayout(video_prefix(system), question_suffix(_QUESTION), "built-in Instruct layout")
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(VIDEO_TOKEN) != 1 or text.count(_QUESTION) != 1 or text.index(VIDEO_TOKEN) > text.index(_QUESTION):
        raise ValueError("the checkpoint's chat template does not place one video and then the question in a user "
                         f"turn (rendered: {text!r}); give the checkpoint a Qwen2-VL chat template")
    prefix, suffix = text.split(VIDEO_TOKEN)
    return ChatLayout(prefix, suffix, "chat template")
