"""The evaluation report: a JSON-ready dict, a readable table, and the summary stored in adapters.

Shares are percentages (0-100, as in the paper's tables); fluency is the n-gram entropy
×100 (the tables' convention); `n` is how many cases a number averages over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# (key, label) in table order; the same keys are used in the JSON report.
METRICS: list[tuple[str, str]] = [
    ("efficacy", "efficacy"),
    ("generalization", "generalization"),
    ("specificity", "specificity"),
    ("free_gen_prompt", "free-gen exact, edit prompts"),
    ("free_gen_paraphrase", "free-gen exact, paraphrases"),
    ("fluency", "fluency (n-gram entropy x100)"),
    ("unedited_facts", "unedited-fact accuracy"),
    ("other_facts", "edited subjects' other facts"),
]
GATE: list[tuple[str, str]] = [
    ("edit_right", "gate: right fact at subject, edit prompts"),
    ("paraphrase_right", "gate: right fact at subject, paraphrases"),
    ("edit_other_fires", "gate: fires at other tokens of edit prompts"),
    ("false_fire", "gate: false fires, unrelated tokens"),
    ("false_fire_shared", "  of which on an edited subject's last token"),
]
WEAK_SPOTS: list[tuple[str, str]] = [
    ("specificity_nb_shares_last_token", "specificity, neighbours holding an edited subject's last token"),
    ("specificity_nb_other", "specificity, other neighbours"),
    ("unedited_shares_last_token", "unedited facts, subject ends in an edited subject's last token"),
    ("unedited_other", "unedited facts, other subjects"),
    ("multi_fact_efficacy", "efficacy, subjects with 2+ edited facts"),
    ("multi_fact_generalization", "generalization, subjects with 2+ edited facts"),
    ("multi_fact_gate_right", "gate right fact, subjects with 2+ edited facts"),
]


@dataclass
class EvalReport:
    """Everything `evaluate` measured. `to_dict()` is the `--json` report."""

    data: dict[str, Any]
    adapter: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    gate: dict[str, Any]
    weak_spots: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    knowedit: dict[str, Any] = field(default_factory=dict)  # KnowEdit's metric names (knowedit.py)
    by_relation: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # relation -> E/G/S
    by_tag: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # fact tag -> E/G/S
    cosines: dict[str, list[float]] = field(default_factory=dict, repr=False)  # for the plot, not in JSON

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "adapter": self.adapter, "metrics": self.metrics, "knowedit": self.knowedit,
                "gate": self.gate, "weak_spots": self.weak_spots, "by_relation": self.by_relation, "by_tag": self.by_tag,
                "settings": self.settings}

    def summary(self) -> dict[str, Any]:
        """The compact record `--write-back` stores in the adapter's `nkv.eval` (model cards show it)."""
        post = {k: m["post"] for k, m in self.metrics.items() if _finite(m.get("post"))}
        pre = {k: m["pre"] for k, m in self.metrics.items() if _finite(m.get("pre"))}
        gate = {k: self.gate[k] for k, _ in GATE if _finite(self.gate.get(k))}
        knowedit = {KNOWEDIT_LABELS[k]: self.knowedit[k]["post"] for k in KNOWEDIT_LABELS
                    if _finite(self.knowedit.get(k, {}).get("post"))}
        return {"data": self.data["name"], "n_facts": self.data["n_facts"], "protocol": self.data["protocol"],
                "tool": self.settings.get("tool"), "post": post, "pre": pre, "gate": gate, "knowedit": knowedit}

    def table(self) -> str:
        """A readable fixed-width table (what `nkv eval` prints)."""
        d, a = self.data, self.adapter
        lines = [f"nkv eval: {d['n_facts']} facts from {d['name']} ({d['protocol']} protocol); adapter "
                 f"{a['n_facts']} facts, layer {a['layer']}, gamma {a['gamma']:g}"
                 + (f", {self.settings['gate_path']} gate" if "gate_path" in self.settings else "")
                 + f"; {a['matched']} of the evaluated facts are in the adapter"
                 + (f" ({a['other_target']} built for another target)" if a.get("other_target") else "")]
        width = max(len(label) for _, label in METRICS + GATE + WEAK_SPOTS) + 2
        lines.append(f"{'metric':<{width}}{'pre':>9}{'post':>9}{'n':>8}")
        lines.append("-" * (width + 26))
        for key, label in METRICS:
            m = self.metrics.get(key)
            if m and m.get("n"):
                lines.append(f"{label:<{width}}{_cell(m.get('pre')):>9}{_cell(m.get('post')):>9}{m['n']:>8}")
        for key, label in GATE:
            n = self.gate.get({"edit_right": "edit_n", "paraphrase_right": "paraphrase_n", "false_fire": "unrelated_tokens",
                               "false_fire_shared": "unrelated_tokens"}.get(key, "edit_n"), 0)
            if _finite(self.gate.get(key)) and n:
                digits = 3 if key.startswith("false_fire") else 2  # targets are ~0.1% of tokens
                lines.append(f"{label:<{width}}{'-':>9}{_cell(self.gate[key], digits):>9}{n:>8}")
        lines.extend(self._knowedit_lines(width))
        spots = [(k, label) for k, label in WEAK_SPOTS if self.weak_spots.get(k, {}).get("n")]
        if spots:
            lines.append("weak spots:")
            for key, label in spots:
                m = self.weak_spots[key]
                lines.append(f"{label:<{width}}{_cell(m.get('pre')):>9}{_cell(m.get('post')):>9}{m['n']:>8}")
        for title, groups in (("by relation", self.by_relation), ("by tag", self.by_tag)):
            if groups:
                lines.append(f"{title} (post: E / G / S):")
                for name, ms in groups.items():
                    cells = " / ".join(_cell(ms[k].get("post")) for k in ("efficacy", "generalization", "specificity"))
                    lines.append(f"  {name:<{width - 2}}{cells:>26}{ms['efficacy']['n']:>8}")
        unrelated = self.settings.get("unrelated_source")
        if unrelated:
            lines.append(f"(unrelated text: {unrelated}; shares in %, fluency x100)")
        return "\n".join(lines)


    def _knowedit_lines(self, width: int) -> list[str]:
        """KnowEdit's names for the same run: teacher-forced except fluency (see knowedit.py)."""
        rows = [(KNOWEDIT_LABELS[k], self.knowedit.get(k)) for k in KNOWEDIT_LABELS]
        rows[2:2] = [(f"  portability: {kind}", m) for kind, m in self.knowedit.get("portability_by_kind", {}).items()]
        shown = [f"{label:<{width}}{_cell(m.get('pre')):>9}{_cell(m.get('post')):>9}{m['n']:>8}"
                 for label, m in rows if m and m.get("n")]
        return ["KnowEdit (EasyEdit's definitions):", *shown] if shown else []


KNOWEDIT_LABELS = {"edit_succ": "Edit Succ. (token acc., teacher-forced)",
                   "portability": "Portability (token acc., teacher-forced)",
                   "locality": "Locality (tokens unchanged vs pre)",
                   "fluency": "Fluency (generated, n-gram entropy x100)"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def pct(value: float | None) -> float | None:
    """A share in [0, 1] as a percentage rounded to 2 decimals (None / NaN stay None)."""
    if value is None or not math.isfinite(value):
        return None
    return round(100.0 * value, 2)


__all__ = ["EvalReport", "METRICS", "GATE", "WEAK_SPOTS", "KNOWEDIT_LABELS", "pct"]
