"""`nkv` command group.

Commands live one per module and are imported only when run, so `nkv --help` and
`nkv inspect` never import transformers. Library errors (`NKVError`) become one line
`Error: ...` on stderr with exit code 1; usage errors exit 2 (click's default).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import click

from nkv import __version__
from nkv.errors import NKVError, NKVFormatError

# command name -> (module under nkv.cli, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("build", "build", "Compute keys and residuals for facts; write an .nkv adapter."),
    "generate": ("generate", "generate", "Show a model's answers with and without an adapter."),
    "eval": ("evaluate", "evaluate", "Measure efficacy, generalization, specificity of an adapter."),
    "convert": ("convert", "convert", "Convert a .gguf file or packaged model to a transformers folder."),
    "inspect": ("manage", "inspect", "Show an adapter's settings, base model and facts."),
    "validate": ("manage", "validate", "Check an .nkv file against the spec."),
    "add": ("build", "add", "Add facts to an adapter (a subject's facts already in it are solved again with them)."),
    "rm": ("manage", "rm", "Remove facts by id or subject."),
    "merge": ("manage", "merge", "Merge two adapters built on the same model and layer."),
    "diff": ("manage", "diff", "Show facts added, removed and changed between two adapters."),
    "quantize": ("manage", "quantize", "Store an adapter's rows as int8 or sign rows (or back)."),
    "push": ("hub", "push", "Publish an adapter to the Hugging Face Hub with a model card."),
    "pull": ("hub", "pull", "Download an adapter from the Hugging Face Hub."),
}


class NKVGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _, _) in COMMANDS.items() if _module_exists(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _module_exists(COMMANDS[name][0]):
            return None
        module, func, _ = COMMANDS[name]
        return getattr(import_module(f"nkv.cli.{module}"), func)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text from the table, so listing commands imports nothing heavy.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NKVError as exc:
            raise click.ClickException(one_line(exc)) from None


def one_line(exc: NKVError) -> str:
    """The error as one line: a file with several problems lists them joined by '; '."""
    if isinstance(exc, NKVFormatError):
        return f"{exc.source}: " + "; ".join(exc.problems)
    return " ".join(str(exc).split())


def _module_exists(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(f"nkv.cli.{module}") is not None


@click.group(cls=NKVGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nkv")
def main() -> None:
    """NKV: knowledge-edit adapters (NeuralDB) for language models.

    Build an adapter from facts, inspect and manage it, share it on the Hub, and load it
    into transformers or vLLM.
    """
