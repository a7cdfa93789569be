"""The Qwen2-VL chat layout of a video question, split where the stream splits it.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>   <- prefix, in the first chunk
    <|video_pad|> x N                                                              <- the video, chunk by chunk
    <|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n                   <- suffix, at question time
"""

SYSTEM_PROMPT = "You are a helpful assistant."


def video_prefix(system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"


def question_suffix(question: str) -> str:
    return f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
