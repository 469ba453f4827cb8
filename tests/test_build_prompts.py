"""Subject and target positions come from the tokenizer: BOS tokens, leading-space and
SentencePiece-style tokenizers, merges across the subject's end."""

from __future__ import annotations

import pytest
import tiny_models as tm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nkv.errors import NKVFactsError
from nkv.facts import Fact
from nkv.editing.solve.prompts import encode_fact
from nkv.editing.tokens import locate

FACT = Fact("dd", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English")


def _with_bos() -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE, but adding a BOS token like Llama-3's tokenizer."""
    base = tm.tiny_tokenizer()
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    bos_id = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-style: '▁' marks word starts (Llama-2, Gemma, Mistral), plus a BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tm.CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("make", [tm.tiny_tokenizer, _with_bos, _metaspace], ids=["bpe", "bpe+bos", "metaspace"])
def test_subject_last_token_and_target_tokens(make):
    tok = make()
    ft = encode_fact(tok, FACT, ["", "Because it rained. "])
    for enc, prefix in zip(ft.rewrites, ["", "Because it rained. "]):
        upto = tok.decode(enc.ids[: enc.subject_pos + 1], skip_special_tokens=True)
        assert upto.replace(" ", "").endswith("DanielleDarrieux")
        assert "Darrieux" not in tok.decode(enc.ids[enc.subject_pos + 1 :])  # nothing of the subject after it
        assert tok.decode(enc.ids[enc.target_start :]).strip() == "English"
        assert tok.decode(enc.ids[: enc.target_start], skip_special_tokens=True).strip() == (prefix + FACT.prompt).strip()
    for key_text, rewrite in zip(ft.key_texts, ft.rewrites):  # the key is read where δ is added
        assert key_text.subject_pos == rewrite.subject_pos
        assert key_text.ids == rewrite.ids[: len(key_text.ids)]
    assert tok.decode(ft.kl.ids[: ft.kl.subject_pos + 1], skip_special_tokens=True).strip() == "Danielle Darrieux"


def test_subject_merged_with_the_next_characters_uses_offsets():
    tok = tm.tiny_tokenizer()
    fact = Fact("x", "Pari", "The Parisians like", "bread")  # "Pari" is inside the word "Parisians"
    enc = locate(tok, fact.prompt, fact.prompt.find("Pari") + 4, fact)
    assert "Pari" in tok.decode(enc.ids[: enc.subject_pos + 1])


class _SlowMerging:
    """A slow tokenizer (no offsets) that merges across the subject's end."""

    is_fast = False

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text.replace("ab", "Z")]}


def test_unlocatable_subject_names_the_fact():
    fact = Fact("f-9", "xa", "xab is", "y")
    with pytest.raises(NKVFactsError, match="fact 'f-9': the tokenizer does not separate the subject 'xa'"):
        locate(_SlowMerging(), fact.prompt, 2, fact)
