"""results/tables.md: one table per (model, data set) from real.py's result files.

    python benchmarks/real/tables.py

Uses benchmarks/compare/plots.py's tables (same columns: E/G/S, free-generation exact
match, unedited-fact accuracy, fluency, gate right, false fires), one block per results
folder and tag (the MEMIT/AlphaEdit rows of a tag such as -scaled sit under the NKV rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks" / "compare"))

import plots  # noqa: E402  (benchmarks/compare/plots.py)


def tags(folder: Path) -> list[str]:
    """"" first, then each other tag found on MEMIT/AlphaEdit result files."""
    found = {""}
    for path in folder.glob("*-*.json"):
        method, _, rest = path.stem.partition("-")
        if method in ("memit", "alphaedit") and "-" in rest:
            found.add("-" + rest.split("-", 1)[1])
    return sorted(found)


def main() -> None:
    out = HERE / "results"
    blocks = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob("run-*.json"))]
        nkv = plots.load(folder, "", ["nkv"])
        for tag in tags(folder):
            results = {**nkv, **plots.load(folder, tag, ["memit", "alphaedit"])}
            if not results:
                continue
            any_doc = next(iter(results.values()))
            b = any_doc["bench"]
            head = (f"### {folder.name}{tag}\n\n{any_doc['data']['name']}, protocol {any_doc['data']['protocol']}, "
                    f"layer {b['layer']}, γ {b['gamma']}; MEMIT λ {b['memit_lambda']:g}, AlphaEdit L2 "
                    f"{b['alphaedit_l2']:g}, τ {b['alphaedit_tau']:.3g} ({b['null_dims']} null dims); "
                    f"C0 from {b['c0_tokens']} tokens; build {b['build_s_all'] / b['n_built']:.1f} s/fact")
            if runs and not tag:
                head += "; wall " + ", ".join(f"{r['wall_s'] / 60:.0f} min ({r['methods']}, n={r['n']})" for r in runs)
            blocks.append(head + "\n\n" + plots.table(results) + "\n")
    (out / "tables.md").write_text("\n".join(blocks))
    print("\n".join(blocks))


if __name__ == "__main__":
    main()
