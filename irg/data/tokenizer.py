"""A byte-level BPE tokenizer trained on a world's own text, in the Qwen2 layout BAGEL checkpoints carry.

Nothing pretrained is available here, so a small model of the shapes world gets a vocabulary of its
own: every word the world writes (prompts, plans, reflections, the IRG system prompt) becomes one or
two tokens, and the special tokens are Qwen2.5's, so the pipeline and the data packing find
``<|im_start|>``, ``<|im_end|>`` and ``<|vision_start|>`` / ``<|vision_end|>`` as in the 7B checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

# Qwen2.5's special tokens, in its order; the pipeline and the packing look up four of them by name.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``Qwen2TokenizerFast`` whose BPE merges are learned from ``texts`` (byte-level, so any text
    still encodes); the special tokens come after the learned vocabulary, as in Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes plus merges), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))  # appended in order after the learned vocabulary
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None,
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.model_max_length = 32768
    return tokenizer
