"""Tables and plots from compare.py's result files.

    python benchmarks/compare/plots.py                  # paper settings for MEMIT/AlphaEdit

    python benchmarks/compare/plots.py --linear-tag=-scaled --name compare-scaled

Writes <name>.md (a markdown table per method and size, and the weak spots) and
<name>.png (E, G, S and unedited-fact accuracy vs number of edits, one line per method,
the unedited model dashed). NKV results come from files tagged --tag, MEMIT and
AlphaEdit from files tagged --linear-tag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = [("efficacy", "E"), ("generalization", "G"), ("specificity", "S"), ("free_gen_prompt", "free-gen E"),
           ("free_gen_paraphrase", "free-gen G"), ("unedited_facts", "unedited acc."), ("fluency", "fluency")]
METHODS = ["nkv", "memit", "alphaedit"]


def load(out: Path, tag: str = "", methods: list[str] | None = None) -> dict[tuple[str, int], dict]:
    """Results `<method>-<n><tag>.json` of `methods` (default: all) under `out`."""
    results = {}
    for path in sorted(out.glob(f"*{tag}.json")):
        doc = json.loads(path.read_text())
        bench = doc.get("bench") if isinstance(doc, dict) else None  # sweep files are lists
        if not bench or path.stem != f"{bench.get('method')}-{bench.get('n_edits')}{tag}":
            continue
        if methods is None or bench["method"] in methods:
            results[(bench["method"], bench["n_edits"])] = doc
    return results


def table(results: dict[tuple[str, int], dict]) -> str:
    sizes = sorted({n for _, n in results})
    head = "| method | edits | " + " | ".join(c for _, c in COLUMNS) + " | gate right | false fires % tokens |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for n in sizes:
        pre = results.get(("nkv", n), {}).get("metrics", {})
        if pre:
            cells = [_cell(pre.get(k, {}).get("pre")) for k, _ in COLUMNS]
            lines.append(f"| unedited model | {n} | " + " | ".join(cells) + " | | |")
        for method in METHODS:
            doc = results.get((method, n))
            if not doc:
                continue
            m, gate = doc["metrics"], doc.get("gate", {})
            cells = [_cell(m.get(k, {}).get("post")) for k, _ in COLUMNS]
            lines.append(f"| {method} | {n} | " + " | ".join(cells)
                         + f" | {_cell(gate.get('edit_right'))} | {_cell(gate.get('false_fire'), 3)} |")
    return "\n".join(lines)


def weak_spot_table(results: dict[tuple[str, int], dict]) -> str:
    lines = ["| method | edits | S, tagged shared_last_token | S, neighbours holding an edited last token | "
             "S, other neighbours | unedited, shared last token | unedited, other | edited subjects' other facts |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ["specificity_tagged_shared", "specificity_nb_shares_last_token", "specificity_nb_other",
            "unedited_shares_last_token", "unedited_other", "same_subject_other_facts"]
    for (method, n), doc in sorted(results.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        spots = dict(doc.get("weak_spots", {}))
        # results written since the per-tag breakdown: the tagged group is by_tag["shared_last_token"]
        tagged = doc.get("by_tag", {}).get("shared_last_token", {}).get("specificity")
        spots.setdefault("specificity_tagged_shared", tagged or {})
        cells = [f"{_cell(spots.get(k, {}).get('pre'))} → {_cell(spots.get(k, {}).get('post'))} (n={spots.get(k, {}).get('n', 0)})"
                 for k in keys]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[tuple[str, int], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({n for _, n in results})
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharex=True)
    for ax, (key, label) in zip(axes, [("efficacy", "efficacy"), ("generalization", "generalization"),
                                       ("specificity", "specificity"), ("unedited_facts", "unedited-fact accuracy")]):
        for method, style in zip(METHODS, ["o-", "s-", "^-"]):
            xs = [n for n in sizes if (method, n) in results]
            ys = [results[(method, n)]["metrics"].get(key, {}).get("post") for n in xs]
            if xs:
                ax.plot(xs, ys, style, label=method)
        pre = [results[("nkv", n)]["metrics"].get(key, {}).get("pre") for n in sizes if ("nkv", n) in results]
        if pre and pre[0] is not None:
            ax.axhline(sum(pre) / len(pre), color="gray", linestyle="--", label="unedited model")
        ax.set_title(label, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="", help="file-name tag of the NKV results")
    p.add_argument("--linear-tag", default=None, help="tag of the MEMIT/AlphaEdit results (default: --tag)")
    p.add_argument("--name", default="compare", help="output names: <name>.png, <name>.md")
    args = p.parse_args()
    out = Path(args.out)
    linear = args.tag if args.linear_tag is None else args.linear_tag
    results = {**load(out, args.tag, ["nkv"]), **load(out, linear, ["memit", "alphaedit"])}
    (out / f"{args.name}.md").write_text(table(results) + "\n\nWeak spots (pre → post):\n\n"
                                         + weak_spot_table(results) + "\n")
    plot(results, out / f"{args.name}.png")
    print(table(results))


if __name__ == "__main__":
    main()
