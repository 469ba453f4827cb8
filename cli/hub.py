"""`nkv push` and `nkv pull`: share adapters through the Hugging Face Hub.

Results go to stdout (the commit URL; the local path), progress and summaries to stderr.
Library errors surface as one `Error: ...` line through the command group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from nkv.atomic import atomic_file


@click.command()
@click.argument("adapter", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--repo", "repo_id", required=True, metavar="USER/NAME",
              help="Hub repo to publish to (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (no effect on an existing repo).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created if missing); default main.")
@click.option("--message", "-m", metavar="TEXT", help="Commit message (default: a summary of the adapter).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--base-model", metavar="ORG/NAME",
              help="Hub id of the base model for the card (default: nkv.base.name when it is a Hub id).")
@click.option("--card/--no-card", default=True, show_default=True,
              help="Write a generated README.md model card (--no-card keeps the repo's current one).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(adapter: Path, repo_id: str, private: bool, revision: str | None, message: str | None,
         create_pr: bool, base_model: str | None, card: bool, as_json: bool) -> None:
    """Validate ADAPTER and publish it to the Hub as adapter.nkv, with a model card, in one commit.

    The token comes from HF_TOKEN or `huggingface-cli login`.

    \b
    nkv push edits.nkv --repo alice/paris-edits
    nkv push edits.nkv --repo alice/paris-edits --revision v2 --message "add 10 facts"
    """
    from nkv.hub import push_adapter

    result = push_adapter(adapter, repo_id, private=private or None, revision=revision, commit_message=message,
                          create_pr=create_pr, base_model=base_model, card=card)
    if as_json:
        click.echo(json.dumps(result.__dict__))
        return
    where = f"pull request {result.pr_url}" if result.pr_url else f"{result.repo_id}@{result.revision}"
    click.echo(f"Pushed {adapter} as {result.filename} to {where} (commit {result.commit_oid[:12]})", err=True)
    click.echo(result.pr_url or result.commit_url)


@click.command()
@click.argument("repo_id", metavar="USER/NAME")
@click.option("--revision", "-r", metavar="REV", help="Branch, tag or commit (default main).")
@click.option("--file", "filename", metavar="NAME",
              help="Which .nkv file, when the repo holds several and no adapter.nkv.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Copy the adapter here (default: leave it in the Hugging Face cache).")
@click.option("--card", is_flag=True, help="Also fetch the repo's README.md model card (text only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(repo_id: str, revision: str | None, filename: str | None, output_dir: Path | None, card: bool,
         as_json: bool) -> None:
    """Download the adapter of repo USER/NAME through the Hugging Face cache, validate it, print its path.

    Honors HF_HUB_OFFLINE=1 (cached copies only) and HF_ENDPOINT.

    \b
    nkv pull alice/paris-edits
    nkv pull alice/paris-edits --revision v1 -o ./edits
    """
    from nkv import NKVAdapter, NKVFormatError
    from nkv.hub import fetch, fetch_model_card

    fetched = fetch(repo_id, revision, filename=filename)
    try:
        adapter = NKVAdapter.load(fetched.path)  # full validation, not only the header
    except NKVFormatError as exc:
        raise type(exc)(fetched.source, exc.problems) from None
    path = fetched.path
    card_path = None
    if output_dir is not None:
        path = _copy_into(fetched.path, output_dir / Path(fetched.filename).name)  # never a path from the repo
    if card:
        card_path = fetch_model_card(repo_id, fetched.commit or revision)
        if card_path is not None and output_dir is not None:
            card_path = _copy_into(card_path, output_dir / "README.md")
    if as_json:
        click.echo(json.dumps({"repo_id": repo_id, "filename": fetched.filename, "commit": fetched.commit,
                               "path": str(path), "card": str(card_path) if card_path else None,
                               "offline": fetched.offline, "n_facts": adapter.n_facts, "layer": adapter.layer,
                               "base": adapter.base.name}))
        return
    origin = " (from the cache, offline)" if fetched.offline else ""
    click.echo(f"Pulled {fetched.source}{origin}: {adapter.n_facts} facts, layer {adapter.layer}, "
               f"base {adapter.base.name}", err=True)
    if card:
        click.echo(f"Model card: {card_path}" if card_path else "The repo has no README.md", err=True)
    click.echo(str(path))


def _copy_into(src: Path, dest: Path) -> Path:
    """Copy atomically so an interrupted pull leaves no half file."""
    with atomic_file(dest) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)
    return dest
