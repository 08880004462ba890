"""Tokenizers trained locally (byte-level BPE, HF ``tokenizers``) for the tiny presets.

Nothing is downloaded: the vocabulary is learned from the training texts and keyphrases (plus the
AimKP instruction), wrapped as a ``PreTrainedTokenizerFast`` with the special tokens the
architecture needs. Byte-level BPE encodes any string (no ``<unk>`` ever appears).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aimkp.models.adapter import QUESTION

# A small built-in corpus so a preset can be built with no training texts at all.
_BUILTIN = (
    "the a an of to and in is it for on with as at by from this that be are was were photo "
    "image picture art drawing vector clip icon cartoon flower tree animal dog cat bird house "
    "car people man woman child sun moon star water sea sky cloud red blue green yellow black "
    "white colour design logo sign symbol map book music food fruit game sport christmas "
    "holiday love heart happy nature city street night day winter summer spring autumn "
    "wildflower hour number url user mention hashtag tweet news today new best good great "
    "keyphrase tag media post text phrases should used what"
)


def train_bpe_tokenizer(
    texts: Iterable[str] | None,
    *,
    special_tokens: Sequence[str],
    vocab_size: int = 3000,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    extra_special: Sequence[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (+ a built-in corpus and the instruction).

    Args:
        texts: training strings (post texts and keyphrases); None uses the built-in corpus only.
        special_tokens: tokens that get the first ids, in this order (never split).
        vocab_size: target vocabulary size (smaller when the corpus has fewer merges).
        bos_token / eos_token / pad_token / unk_token: names of the roles among special_tokens.
        extra_special: further special tokens registered as additional special tokens.
        chat_template: optional Jinja chat template stored with the tokenizer.
    """
    corpus = [_BUILTIN, QUESTION]
    if texts is not None:
        corpus.extend(t for t in texts if t)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        additional_special_tokens=list(extra_special) or None,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
