"""The offline base model: a byte-level BPE tokenizer and a GPT-2-style LM made from the dump text,
saved with ``save_pretrained`` so every later stage loads it like any hub model."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from stackrlhf.models.sizes import SIZES

EOS = "<|endoftext|>"
PAD = "<|pad|>"



def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme: any byte sequence is representable, no unknown token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None)
    fast.padding_side = "left"
    fast.model_max_length = 1_000_000
    return fast


def make_model(size: str, tok: PreTrainedTokenizerFast, context: int | None = None) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of the given size. The head is not tied to the embeddings, so that
    training only the top blocks and the head (``num_layers_unfrozen``) never moves the frozen trunk."""
    layers, width, heads, ctx, _ = SIZES[size]
    config = GPT2Config(vocab_size=len(tok), n_positions=context or ctx, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return GPT2LMHeadModel(config)
