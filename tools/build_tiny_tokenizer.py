"""Build the byte-level BPE tokenizer shipped with the built-in tiny models.

Run once from the repository root; the output is committed under
streamer/assets/tiny-tokenizer/. Deterministic: same corpus, same merges.

    python tools/build_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "streamer" / "assets" / "tiny-tokenizer"
BPE_VOCAB = 1024

# Qwen2's special tokens, in Qwen2's order, so id arithmetic matches the real vocabulary's layout.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

WORDS = """
the a an of in on at to from with and or but not is are was were be been what which who when where
why how many much first last before after during video frame frames scene person people man woman
child dog cat car red green blue yellow black white orange purple pink brown gray colour color shape
circle square triangle star digit number one two three four five six seven eight nine ten zero left
right top bottom middle moves moving appears appeared disappears happens happened describe answer
question option options letter choices given directly system user assistant you helpful please
begin end start stop time second seconds minute count times does do did this that these those there
""".split()

TEMPLATES = [
    "You are a helpful assistant.",
    "Describe what happens in the video.",
    "What happens in the video?",
    "Answer with the option's letter from the given choices directly.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "A. {w} B. {w} C. {w} D. {w}",
    "How many times does the {w} appear?",
    "What colour is the {w} at the start?",
    "The answer is {w}.",
]


def corpus():
    for i, w in enumerate(WORDS):
        for t in TEMPLATES:
            yield t.format(w=w)
        yield " ".join(WORDS[i:i + 12])
        yield f"{i} {i * 7} {i * 13 % 100}. {w.capitalize()}!"


def main():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()
