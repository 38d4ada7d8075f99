"""A character-level Hugging Face tokenizer for tiny custom-vocabulary models.

lm-eval's HFLM (and `onmerge eval`) read a model's tokenizer from its directory; a model trained
on its own character vocabulary (the CPU study's, the tests') gets one from here, saved next to
its weights with `save_pretrained`.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast


def char_tokenizer(chars: list[str], pad: str = "<pad>", bos: str = "<bos>", eos: str = "<eos>") -> PreTrainedTokenizerFast:
    """Ids 0, 1, 2 are pad, BOS and EOS; character i of `chars` has id i + 3. Every character of a
    text is one token (spaces and newlines included); `add_special_tokens=True` prepends BOS,
    and decoding joins the characters back without separators."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise ValueError(f"chars must be distinct single characters, got {chars!r}")
    vocab = {pad: 0, bos: 1, eos: 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=pad))
    # "(?s)." would split too, but \s\S also keeps "\n" a token on every regex engine.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos,
                                   unk_token=pad, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])
