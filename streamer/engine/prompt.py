"""The Qwen-VL chat layout of a video question, split where the stream splits it.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>   <- prefix, in the first chunk
    <|video_pad|> x N                                                              <- the video, chunk by chunk
    <|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n                   <- suffix, at question time

That is the Instruct checkpoints' chat template. A checkpoint whose tokenizer has a chat template
gets its layout from the template itself (chat_layout renders it once around a placeholder), so a
base checkpoint or a changed template lays the prompt out as transformers' apply_chat_template does.

Qwen3-VL's processor writes every frame pair as its own vision block after its time in text,
`<0.8 seconds><|vision_start|><|video_pad|> x n<|vision_end|>`, in place of the template's
`<|vision_start|><|video_pad|><|vision_end|>` (Qwen's released processor, qwen-vl-utils and vLLM
replace the three; transformers 5's generic expansion keeps the template's pair around the frames,
a layout the checkpoints were not trained on, not followed). Its layout (`timestamps=True`) is the
same prefix and suffix without that outer pair, and each chunk carries its pairs' own text.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant."
VIDEO_TOKEN = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
_QUESTION = "\x00question\x00"  # a placeholder no template writes itself


def video_prefix(system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"


def question_suffix(question: str) -> str:
    return f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


def pair_opening(seconds: float) -> str:
    """Qwen3-VL's text before a frame pair's video tokens (its closing is VISION_END)."""
    return f"<{seconds:.1f} seconds>{VISION_START}"


def pair_seconds(first_frame: int, frames: int, fps: float, temporal_patch_size: int = 2) -> list[float]:
    """The time of each frame pair of `frames` frames from the stream's frame `first_frame` on, as Qwen3-VL's
    processor computes it from the frames' indices and rate: the mean of the pair's first and last frame's
    index / fps (Python floats), a last frame without a partner paired with itself."""
    indices = list(range(first_frame, first_frame + frames))
    indices += indices[-1:] * (-frames % temporal_patch_size)
    return [(indices[i] / fps + indices[i + temporal_patch_size - 1] / fps) / 2
            for i in range(0, len(indices), temporal_patch_size)]


@dataclass(frozen=True)
class ChatLayout:
    prefix: str  # everything before the video tokens
    suffix: str  # everything after them, with _QUESTION where the question goes
    source: str  # "chat template" or "built-in Instruct layout"

    def question_suffix(self, question: str) -> str:
        return self.suffix.replace(_QUESTION, question)


def chat_layout(tokenizer: PreTrainedTokenizerBase, system: str = SYSTEM_PROMPT,
                timestamps: bool = False) -> ChatLayout:
    """The layout of one video question: from the tokenizer's chat template when it has one, else the
    built-in Instruct layout above; `timestamps`: Qwen3-VL's, whose frame pairs bring their own vision tokens."""
    layout = template_layout(tokenizer, system)
    if timestamps and layout.prefix.endswith(VISION_START) and layout.suffix.startswith(VISION_END):
        # the processor replaces the template's <|vision_start|><|video_pad|><|vision_end|> by the frames
        return ChatLayout(layout.prefix.removesuffix(VISION_START), layout.suffix.removeprefix(VISION_END),
                          layout.source)
    return layout


def template_layout(tokenizer: PreTrainedTokenizerBase, system: str) -> ChatLayout:
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
