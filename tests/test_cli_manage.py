"""`nkv inspect | validate | rm | merge | diff` and `nkv --version`, through click's CliRunner.

Every user error must be exactly one line `Error: ...` on stderr with exit code 1 and no
traceback; usage errors exit 2.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import nkv
from nkv import NKVAdapter, constants as C
from nkv.cli.main import main

GOLDEN = Path(__file__).resolve().parent.parent / "spec" / "examples" / "golden.nkv"


def _runner() -> CliRunner:
    try:  # click 8.1 mixes stderr into stdout unless told; 8.2 keeps them apart and dropped the flag
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run(*args: str | Path) -> Result:
    return _runner().invoke(main, [str(a) for a in args])


def assert_user_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    return Path(shutil.copy(GOLDEN, tmp_path / "golden.nkv"))


@pytest.fixture
def other(tmp_path: Path) -> Path:
    """Golden minus cf-0, plus cf-9, with cf-1 changed (a different residual)."""
    a = NKVAdapter.load(GOLDEN)
    b = a.remove(ids=["cf-0"])
    b.residuals[0, 0] = 9.0
    fact = nkv.Fact(id="cf-9", subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano")
    b = b.add([fact], torch.ones(1, 4), torch.zeros(1, 3))
    return b.save(tmp_path / "other.nkv")


def _broken(tmp_path: Path, name: str = "broken.nkv", **meta: str) -> Path:
    data = GOLDEN.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    doc = json.loads(data[8 : 8 + n])
    doc["__metadata__"].update(meta)
    text = json.dumps(doc).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return path


# ------------------------------------------------------------------ happy paths
def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"nkv, version {nkv.__version__}"


def test_inspect_table(golden: Path) -> None:
    result = run("inspect", golden)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("nkv 1.0", "facts         2", "layer         1 (transformer.h.1.mlp.c_proj)",
                   "gamma         0.65", "F32", "nkv-spec/golden-tiny @ v1", "GPT2LMHeadModel (gpt2, 2 layers",
                   "nkvfp1:fro=1.510381e+00", "make_golden.py", "1.2 KB"):
        assert needle in out, needle
    assert "Danielle" not in out  # facts only with --facts


def test_inspect_facts_and_limit(golden: Path) -> None:
    out = run("inspect", golden, "--facts").stdout
    assert "cf-0" in out and "cf-1" in out and "Zürich" in out
    limited = run("inspect", golden, "--facts", "--limit", "1").stdout
    assert "cf-0" in limited and "cf-1" not in limited and "1 more" in limited


def test_inspect_json(golden: Path) -> None:
    result = run("inspect", golden, "--json", "--facts")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert (info["n_facts"], info["layer"], info["gamma"], info["dtype"]) == (2, 1, 0.65, "F32")
    assert info["base"]["fingerprint"] == nkv.read_header(golden).base.fingerprint
    assert info["size_bytes"] == golden.stat().st_size and info["format_version"] == "1.0"
    assert [f["id"] for f in info["facts"]] == ["cf-0", "cf-1"]
    assert info["tensors"][C.T_KEYS] == {"dtype": "F32", "shape": [2, 4]}
    assert "facts" not in json.loads(run("inspect", golden, "--json").stdout)
    assert len(json.loads(run("inspect", golden, "--json", "--facts", "--limit", "1").stdout)["facts"]) == 1


def test_validate_ok(golden: Path) -> None:
    result = run("validate", golden)
    assert result.exit_code == 0 and result.stdout.startswith(f"OK {golden}: 2 facts, layer 1, gamma 0.65, F32")
    assert json.loads(run("validate", golden, "--json").stdout)["valid"] is True


def test_validate_invalid(tmp_path: Path) -> None:
    path = _broken(tmp_path, **{"nkv.gamma": "7", "nkv.layer": "5"})
    result = run("validate", path)
    assert_user_error(result, str(path), "not a valid NKV adapter", "2 problems")
    assert "V6: metadata 'nkv.gamma'" in result.stdout and "nkv.layer" in result.stdout
    report = json.loads(run("validate", path, "--json").stdout)
    assert report["valid"] is False and len(report["problems"]) == 2


def test_rm_in_place_and_to_output(golden: Path, tmp_path: Path) -> None:
    result = run("rm", golden, "--id", "cf-0", "-o", tmp_path / "out.nkv")
    assert result.exit_code == 0 and "removed 1 fact (cf-0); 1 left" in result.stdout
    assert NKVAdapter.load(tmp_path / "out.nkv").ids == ["cf-1"]
    assert NKVAdapter.load(golden).ids == ["cf-0", "cf-1"]  # untouched with -o

    result = run("rm", golden, "--subject", "Eiffel Tower")
    assert result.exit_code == 0 and "removed 1 fact (cf-1)" in result.stdout
    assert NKVAdapter.load(golden).ids == ["cf-0"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert run("rm", golden, "--id", "nope", "--missing-ok").exit_code == 0


def test_merge_and_policies(golden: Path, other: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.nkv"
    assert_user_error(run("merge", golden, other, "-o", out), "'cf-1'", "--on-conflict")
    assert not out.exists()
    result = run("merge", golden, other, "-o", out, "--on-conflict", "theirs")
    assert result.exit_code == 0, result.output
    assert "merged 2 + 2 facts -> 3" in result.stdout and "1 conflicting id(s) resolved as theirs" in result.stdout
    merged = NKVAdapter.load(out)
    assert merged.ids == ["cf-0", "cf-1", "cf-9"] and merged.residuals[1, 0] == 9.0
    run("merge", golden, other, "-o", out, "--on-conflict", "ours")
    assert NKVAdapter.load(out).residuals[1, 0] == -0.125  # golden's own row


def test_merge_gamma(golden: Path, tmp_path: Path) -> None:
    g2 = NKVAdapter.load(GOLDEN)
    g2.gamma = 0.7
    g2_path = g2.save(tmp_path / "g2.nkv")
    out = tmp_path / "m.nkv"
    assert_user_error(run("merge", golden, g2_path, "-o", out), "gamma differs (0.65 vs 0.7)", "--gamma")
    assert run("merge", golden, g2_path, "-o", out, "--gamma", "0.7").exit_code == 0
    assert NKVAdapter.load(out).gamma == 0.7


def test_diff(golden: Path, other: Path) -> None:
    result = run("diff", golden, other)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["+ cf-9", "- cf-0", "~ cf-1"]
    assert "1 added, 1 removed, 1 changed" in result.stderr
    same = run("diff", golden, golden)
    assert same.exit_code == 0 and same.stdout.strip() == "no differences"
    info = json.loads(run("diff", golden, other, "--json").stdout)
    assert (info["added"], info["removed"], info["changed"], info["identical"]) == (["cf-9"], ["cf-0"], ["cf-1"], False)


def test_diff_settings(golden: Path, tmp_path: Path) -> None:
    g2 = NKVAdapter.load(GOLDEN)
    g2.gamma, g2.layer = 0.5, 0
    path = g2.save(tmp_path / "g2.nkv")
    result = run("diff", golden, path)
    assert result.exit_code == 0 and "gamma: 0.65 -> 0.5" in result.stdout and "layer: 1 -> 0" in result.stdout
    assert json.loads(run("diff", golden, path, "--json").stdout)["settings"]["gamma"] == [0.65, 0.5]


# ------------------------------------------------------------------ user errors: one line, exit 1
def test_user_errors_are_one_line(tmp_path: Path, golden: Path) -> None:
    bad = _broken(tmp_path, **{"nkv.gamma": "7", "nkv.layer": "5"})
    newer = _broken(tmp_path, "newer.nkv", **{"nkv.version": "3.1"})
    garbage = tmp_path / "garbage.nkv"
    garbage.write_bytes(b"not an adapter at all")
    moved = NKVAdapter.load(GOLDEN)
    moved.layer = 0
    moved_path = moved.save(tmp_path / "layer0.nkv")
    cases = [
        (("inspect", bad), [str(bad), "V6", "nkv.gamma", "; V6", "nkv.layer"]),
        (("inspect", garbage), [str(garbage), "V1"]),
        (("inspect", newer), ["V5", "3.1", "pip install -U nkv"]),
        (("validate", newer), ["not a valid NKV adapter (1 problem)"]),
        (("rm", bad, "--id", "cf-0"), ["V6"]),
        (("rm", golden, "--id", "nope"), ["no fact with id 'nope'", "nkv inspect --facts"]),
        (("rm", golden, "--subject", "Nobody"), ["subject 'Nobody'"]),
        (("merge", golden, moved_path, "-o", tmp_path / "x.nkv"), ["layer: 1 vs 0"]),
        (("merge", golden, garbage, "-o", tmp_path / "x.nkv"), [str(garbage)]),
        (("diff", golden, bad), [str(bad), "V6"]),
        (("diff", newer, golden), ["pip install -U nkv"]),
    ]
    for args, needles in cases:
        assert_user_error(run(*args), *needles)
    assert NKVAdapter.load(golden).ids == ["cf-0", "cf-1"]  # failed rm left it alone


def test_inspect_facts_refuses_bad_records(tmp_path: Path) -> None:
    data = bytearray(GOLDEN.read_bytes())
    at = data.index(b'"id":"cf-1"')
    data[at : at + 11] = b'"id":"cf-0"'  # same length: a duplicate id, header still valid
    path = tmp_path / "dup.nkv"
    path.write_bytes(bytes(data))
    assert run("inspect", path).exit_code == 0  # header only
    assert_user_error(run("inspect", path, "--facts"), "V9", "duplicate fact id 'cf-0'")


# ------------------------------------------------------------------ usage errors: exit 2
@pytest.mark.parametrize("args", [
    ("inspect",),
    ("inspect", "missing.nkv"),
    ("inspect", "{golden}", "--limit", "-1"),
    ("validate", "{tmp}"),  # a directory
    ("rm", "{golden}"),  # neither --id nor --subject
    ("rm", "{golden}", "--bogus"),
    ("merge", "{golden}", "{golden}"),  # no -o
    ("merge", "{golden}", "{golden}", "-o", "{tmp}/m.nkv", "--on-conflict", "mine"),
    ("merge", "{golden}", "{golden}", "-o", "{tmp}/m.nkv", "--gamma", "1.5"),
    ("diff", "{golden}"),
    ("frobnicate",),
])
def test_usage_errors_exit_2(args: tuple[str, ...], golden: Path, tmp_path: Path) -> None:
    result = run(*(a.format(golden=golden, tmp=tmp_path) for a in args))
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output and "Error:" in result.stderr


def test_manage_commands_do_not_import_transformers() -> None:
    code = ("import sys\nfrom nkv.cli.main import main\n"
            f"main(['inspect', {str(GOLDEN)!r}, '--facts'], standalone_mode=False)\n"
            f"main(['validate', {str(GOLDEN)!r}], standalone_mode=False)\n"
            "print([m for m in ('transformers', 'vllm', 'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_writes_a_large_adapter_with_its_sketch_projection(golden: Path, other: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """From SKETCH_MIN_FACTS facts, where loaders take the sketch path, the files the CLI writes
    carry the projection and so the keys' sketches (spec §4.2): attaching reads them instead of
    fitting and computing them. Below it nothing is added."""
    monkeypatch.setattr(C, "SKETCH_MIN_FACTS", 3)
    merged = tmp_path / "merged.nkv"
    assert run("merge", golden, other, "-o", merged, "--on-conflict", "theirs").exit_code == 0
    data = merged.read_bytes()
    assert C.T_SKETCH_PROJ.encode() in data and C.T_SKETCH_KEYS.encode() in data
    small = tmp_path / "small.nkv"
    assert run("rm", golden, "--id", "cf-0", "-o", small).exit_code == 0
    assert NKVAdapter.load(small).sketch_proj is None  # 1 fact: the exact path, no projection
    bare = NKVAdapter.load(merged).with_sketch(0).save(tmp_path / "bare.nkv")  # written by another tool
    for args in (("rm", bare, "--id", "nope", "--missing-ok"), ("quantize", bare)):
        NKVAdapter.load(merged).with_sketch(0).save(bare)
        assert run(*args).exit_code == 0
        assert NKVAdapter.load(bare).sketch_proj is not None, args  # 3 facts: given one as it is written
