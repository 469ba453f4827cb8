"""`nkv convert MODEL`: a .gguf file or packaged model as a transformers folder, for any runtime.

`nkv build/eval/generate --model` accept a .gguf file directly; vLLM and other tools want a
folder. This converts once (cached by the file's SHA-256) and prints the folder, so
`vllm serve "$(nkv convert smollm2-135m)"` serves the same weights the adapter was built on.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("model")
def convert(model: str) -> None:
    """Print the transformers folder for MODEL (a .gguf file, or smollm2-135m / gemma3-270m).

    \b
    nkv convert smollm2-135m
    nkv convert ./SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from nkv.errors import NKVError
    from nkv.loaders.gguf import PACKAGED, model_source

    if model not in PACKAGED and not model.lower().endswith(".gguf"):
        raise NKVError(f"{model!r} is neither a .gguf file nor a packaged model ({', '.join(PACKAGED)}); "
                       "a transformers folder or Hub id needs no conversion")
    click.echo(model_source(model))


__all__ = ["convert"]
