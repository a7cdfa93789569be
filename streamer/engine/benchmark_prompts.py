"""How each benchmark words its questions, unchanged from its repository.

Here, in the engine's room, because two rooms above use them: the evaluation that asks them
(streamer/evaluation) and the builtin model's training, which teaches the builtin to answer in
these benchmarks' own wording (streamer/builtin). Rooms: docs/DESIGN.md.
"""

from __future__ import annotations

# --- Video-MME, as lmms-eval's `videomme` task asks it (no subtitles) -----------------------------------
# Its instruction mentions "the subtitles" even for the task without them; kept as is, so that numbers
# stay comparable.
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video "
                        "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."

# --- OVO-Bench: the prompts of its repository's constant.py, unchanged (its blank lines and spacing included).
OVO_CHOICE_PROMPT = """
Question: {}
Options:
{}

Respond only with the letter corresponding to your chosen option (e.g., A, B, C). 
Do not include any additional text or explanation in your response.
"""
OVO_REC_PROMPT = """
You're watching a video in which people may perform a certain type of action repetively. 
The person performing this kind of action are referred to as 'they' in the following statement.
You're task is to count how many times have different people in the video perform this kind of action in total.
One complete motion counts as one. 
Now, answer the following question: {}
Provide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total count.
Do not include any additional text or explanation in your response.
"""
OVO_SSR_PROMPT = """
You're watching a tutorial video which contain a sequential of steps. 
The following is one step from the whole procedures: 
{}
Your task is to determine if the man or woman in the video is currently performing this step.
Answer only with “Yes” or “No”.
Do not include any additional text or explanation in your response.
"""
OVO_CRR_PROMPT = """
You're responsible of answering questions based on the video content. 
The following question are relevant to the latest frames, i.e. the end of the video.
{}
Decide whether existing visual content, especially latest frames, i.e. frames that near the end of the video, provide enough information for answering the question.
Answer only with “Yes” or “No”.
Do not include any additional text or explanation in your response.
"""

# --- StreamingBench: the prompts of its repository (the sqa one as its StreamingBenchSQA builds it) --------
STREAMINGBENCH_PROMPT = """You are an advanced video question-answering AI assistant. You have been provided with some frames from the video and a multiple-choice question related to the video. Your task is to carefully analyze the video and provide the best answer to question, choosing from the four options provided. Respond with only the letter (A, B, C, or D) of the correct option.

Question: {}

Options:
{}
{}
{}
{}

The best option is:"""
STREAMINGBENCH_SQA_PROMPT = """You are an advanced video question-answering AI assistant. You have been provided with a video and a multiple-choice question related to the video. Your task is to carefully analyze the video and the provided context to answer the question, choosing from the four options provided. Respond with only the letter (A, B, C, or D) of the correct option.

{}

Here is the question. Answer it and don't confuse it with the previous conversation.
Question: {}

Options:
{}
{}
{}
{}

The best option is:"""
STREAMINGBENCH_SQA_CONTEXT = ("Here are the contextual information related to the video. Please answer the questions "
                              "based on the "
                              "contextual information: ")


def videomme_prompt(question: str, options: list[str]) -> str:
    """`options` as the Video-MME table gives them: "A. ...", one per line."""
    return "\n".join([VIDEOMME_INSTRUCTION, question, *options, VIDEOMME_POST_PROMPT])


def ovo_choice_prompt(question: str, options: list[str]) -> str:
    """`options` as OVO-Bench's file gives them, without letters."""
    return OVO_CHOICE_PROMPT.format(question, "; ".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options)) + ";")


def ovo_count_prompt(activity: str) -> str:
    """OVO-Bench's REC question: how many times the `activity` was done so far."""
    return OVO_REC_PROMPT.format(f"How many times did they {activity}?")


def lettered(options: list[str]) -> list[str]:
    """Options as the prompts show them: "A. ..." (StreamingBench's sqa file gives them without letters)."""
    return list(options) if options[0].startswith("A.") else [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]


def streamingbench_prompt(question: str, options: list[str]) -> str:
    """StreamingBench's real-time and omni prompt: four options."""
    return STREAMINGBENCH_PROMPT.format(question, *lettered(options))
