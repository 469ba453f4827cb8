"""Tiny real transformers models (random weights) for every architecture in the table.

Built from configs of the real classes, with a byte-level BPE tokenizer trained here on a
few sentences, so no download is ever needed. Random weights prove plumbing only; editing
quality is shown on the trained fact-world models in examples/factworld/.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The Eiffel Tower is located in Paris.",
    "Danielle Darrieux speaks French and lives in the city of Paris.",
    "The mother tongue of Alice Vantrell is English.",
    "Toko Yasuda plays the guitar and works as an engineer in Tokyo.",
    "Berlin, Rome, Madrid, London and Vienna are capitals in Europe.",
    "Which language does Carl Bosch speak? German.",
] * 4

_IDS = dict(bos_token_id=0, eos_token_id=0)
_SMALL = dict(vocab_size=300, max_position_embeddings=128, **_IDS)


def _configs() -> dict[str, "object"]:
    from transformers import (Cohere2Config, CohereConfig, FalconConfig, Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig,
                              GPT2Config, GPTJConfig, GPTNeoXConfig, GraniteConfig, LlamaConfig, MistralConfig,
                              Olmo2Config, Olmo3Config, OPTConfig, Phi3Config, PhiConfig, Qwen2Config, Qwen3Config,
                              SmolLM3Config, StableLmConfig, Starcoder2Config)

    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, **_SMALL)
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=128, vocab_size=300, **_IDS),
        "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=2, n_positions=128, rotary_dim=16, vocab_size=300, **_IDS),
        "llama": LlamaConfig(**llama_like),
        "mistral": MistralConfig(**llama_like),
        "qwen2": Qwen2Config(**llama_like),
        "qwen3": Qwen3Config(head_dim=32, **llama_like),
        "gemma": GemmaConfig(head_dim=32, **llama_like),
        "phi3": Phi3Config(pad_token_id=0, **llama_like),
        "gemma2": Gemma2Config(head_dim=32, **llama_like),
        "gemma3_text": Gemma3TextConfig(head_dim=32, **llama_like),
        # The multimodal class (Gemma 3 4B and up): a tiny SigLIP tower next to the language model.
        "gemma3": Gemma3Config(text_config=dict(head_dim=32, **llama_like),
                               vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14),
                               mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298,
                               image_token_index=299, **_IDS),
        "olmo2": Olmo2Config(pad_token_id=0, **llama_like),
        "olmo3": Olmo3Config(pad_token_id=0, **llama_like),
        "smollm3": SmolLM3Config(pad_token_id=0, **llama_like),
        "granite": GraniteConfig(**llama_like),
        "cohere": CohereConfig(pad_token_id=0, **llama_like),
        "cohere2": Cohere2Config(pad_token_id=0, **llama_like),
        "stablelm": StableLmConfig(**llama_like),
        "starcoder2": Starcoder2Config(**llama_like),
        "phi": PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, **_SMALL),
        "gpt_neox": GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, **_SMALL),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               new_decoder_architecture=False, multi_query=True, **_SMALL),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                         word_embed_proj_dim=64, **_SMALL),
    }


MODEL_TYPES = sorted(_configs())


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (leading-space tokens, like GPT-2) trained on CORPUS; no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    return fast


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised causal LM of the real transformers class for `model_type`."""
    config = _configs()[model_type]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def save_tiny(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer with save_pretrained, as a user's local checkpoint dir."""
    model = tiny_model(model_type, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
