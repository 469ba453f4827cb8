"""The generated model card: Hub metadata, fact sample, details, evaluation, usage."""

from __future__ import annotations

import yaml

from hub_fixtures import BASE, small_adapter
from nkv import Fact
from nkv.model_card import SAMPLE_FACTS, hub_base_model, render_model_card


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_front_matter_declares_library_base_model_and_tags():
    meta = front_matter(render_model_card(small_adapter(), "alice/edits"))
    assert meta["library_name"] == "nkv"
    assert meta["base_model"] == BASE
    assert meta["base_model_relation"] == "adapter"
    assert {"nkv", "neuraldb", "knowledge-editing"} <= set(meta["tags"])


def test_local_path_base_is_not_declared_as_base_model_unless_overridden():
    adapter = small_adapter(base_name="/home/me/models/llama")
    card = render_model_card(adapter, "alice/edits")
    meta = front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "--base-model" in card  # tells the user how to link it
    meta = front_matter(render_model_card(adapter, "alice/edits", base_model="meta-llama/Llama-3.2-1B"))
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert hub_base_model(small_adapter(base_name="a/b/c")) is None
    assert hub_base_model(small_adapter(base_name="../x")) is None


def test_a_gguf_or_packaged_base_gets_snippets_that_load_it():
    for name in ("smollm2-135m", "./SmolLM2-135M-Instruct.Q4_1.gguf"):
        card = render_model_card(small_adapter(base_name=name), "alice/edits")
        assert f'load_model("{name}")' in card and f'LLM(model=model_source("{name}")' in card
        assert "from_pretrained" not in card  # from_pretrained cannot read a packaged name


def test_body_lists_facts_details_and_loading_snippets():
    adapter = small_adapter(n_facts=3)
    card = render_model_card(adapter, "alice/edits")
    assert "| subject | prompt | new target | old target |" in card
    assert "| Subject 0 | Subject 0 lives in | City0 | Old0 |" in card
    assert "**3 facts**" in card
    assert adapter.base.fingerprint in card  # in full: it is what loaders check
    assert "| layer | 1 of 2 (`model.layers.1.mlp.down_proj`) |" in card
    assert "| γ (gate threshold) | 0.65 |" in card
    assert "NKV 1.0" in card
    assert 'load_nkv_adapter(model, "alice/edits")' in card
    assert 'additional_config={"nkv": {"adapter": "alice/edits"}}' in card
    assert f'from_pretrained("{BASE}")' in card
    assert "## Evaluation" not in card  # the adapter carries no results


def test_long_adapters_show_a_sample_and_count_the_rest():
    card = render_model_card(small_adapter(n_facts=SAMPLE_FACTS + 5), "alice/edits")
    assert "| Subject 9 |" in card and "| Subject 10 |" not in card
    assert "…and 5 more" in card


def test_fact_text_cannot_break_the_table_or_inject_html():
    adapter = small_adapter(n_facts=1)
    adapter.facts[0] = Fact(id="f0", subject="A|B", prompt="A|B is\nin <script>x</script>", target_new="Y")
    card = render_model_card(adapter, "alice/edits")
    row = next(line for line in card.splitlines() if line.startswith("| A"))
    assert row == r"| A\|B | A\|B is in &lt;script&gt;x&lt;/script&gt; | Y | — |"


def test_evaluation_results_are_rendered_when_present():
    adapter = small_adapter(eval={"counterfact": {"efficacy": 0.98765, "specificity": 0.9}, "n": 200})
    card = render_model_card(adapter, "alice/edits")
    assert "## Evaluation" in card
    assert "| counterfact.efficacy | 0.9877 |" in card
    assert "| n | 200 |" in card


def test_importing_nkv_and_its_hub_modules_does_not_import_huggingface_hub():
    import subprocess
    import sys

    code = ("import sys, nkv, nkv.hub, nkv.model_card, nkv.cli.hub; "
            "assert 'huggingface_hub' not in sys.modules, 'imported huggingface_hub'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
