"""Drive the running service over HTTP with many adapters and print one table of throughput ratios.

Starts the service itself on loopback, once per batching strategy (mixed, grouped), on a store of synthetic PEFT
adapters made here with PEFT on the served base (LoRA r 8 and 16 on q/v, prefix tuning), so all ratios come from
one run on one machine. Usage:

    .venv/bin/python scripts/benchmark.py [--requests 512] [--gen-requests 64] [--lora 32] [--prefix 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.model.loading import embedded_model_folder  # noqa: E402
from service.settings import EMBEDDED_MODEL_ID, Settings  # noqa: E402

WORDS = "the a service model adapter fast slow good bad day night people think great terrible movie food".split()


def make_adapters(base: Path, store: Path, loras: int, prefixes: int) -> dict[str, list[str]]:
    """Synthetic adapters of both tasks; random weights, real PEFT files."""
    names: dict[str, list[str]] = {"classification": [], "generation": []}
    torch.manual_seed(0)
    for task, task_type in (("classification", TaskType.SEQ_CLS), ("generation", TaskType.CAUSAL_LM)):
        for index in range(loras + prefixes):
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
            else:
                model = AutoModelForCausalLM.from_pretrained(base)
            if index < loras:
                config = LoraConfig(task_type=task_type, r=8 if index % 2 else 16, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)
                name = f"bench-{task[:3]}-lora-{index}"
            else:
                config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=8 + 4 * (index % 3))
                name = f"bench-{task[:3]}-prefix-{index}"
            peft_model = get_peft_model(model, config)
            peft_model.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
            peft_model.save_pretrained(store / name)
            names[task].append(name)
    return names


def start_server(store: Path, batching: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "SERVICE_ADAPTERS_DIR": str(store), "SERVICE_BATCHING": batching,
           "SERVICE_MAX_BATCH_SIZE": "64", "SERVICE_MAX_WAIT_MS": "10", "SERVICE_MAX_LOADED_ADAPTERS": "128"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                               env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def text_of(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def pick(rng: random.Random, adapters: list[str], zipf: bool) -> str:
    if not zipf:
        return rng.choice(adapters)
    weights = [1.0 / (rank + 1) for rank in range(len(adapters))]
    return rng.choices(adapters, weights)[0]


async def stream_generate(url: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """Streamed generation: tokens/s, time to first token and inter-token latency percentiles."""
    semaphore = asyncio.Semaphore(concurrency)
    first: list[float] = []
    gaps: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: dict) -> None:
            nonlocal tokens
            async with semaphore:
                started = last = time.perf_counter()
                async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
                    response.raise_for_status()
                    event = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "token":
                            now = time.perf_counter()
                            (gaps if first and last != started else first).append(now - last)
                            last = now
                        elif line.startswith("data: ") and event == "done":
                            tokens += json.loads(line[6:])["generated_tokens"]
        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        seconds = time.perf_counter() - started

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"tok/s": tokens / seconds, "ttft p50": pct(first, 0.5), "ttft p99": pct(first, 0.99),
            "itl p50": pct(gaps, 0.5), "itl p99": pct(gaps, 0.99)}


async def drive(url: str, route: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    """Send bodies with bounded concurrency; seconds, per-request latencies, generated tokens."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: dict) -> None:
            nonlocal tokens
            async with semaphore:
                started = time.perf_counter()
                response = await client.post(route, json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                tokens += response.json().get("generated_tokens", 0)
        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
    return time.perf_counter() - started, latencies, tokens


def peft_loop(base: Path, store: Path, adapters: list[str], task: str, inputs: list[str], limit: int) -> float:
    """The plain-PEFT way: set_adapter, then one request at a time. Returns requests/s (classification) or
    generated tokens/s (generation) over the first ``limit`` inputs."""
    from peft import PeftModel

    loader = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs = {"num_labels": 2} if task == "classification" else {}
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(base)
    models: dict[str, PeftModel] = {}
    for kind in ("lora", "prefix"):
        names = [a for a in adapters if f"-{kind}-" in a]
        model = PeftModel.from_pretrained(loader.from_pretrained(base, **kwargs), store / names[0],
                                          adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(store / name, adapter_name=name)
        model.config.pad_token_id = tokenizer.pad_token_id
        models.update({name: model.eval() for name in names})
    rng = random.Random(1)
    work = [(rng.choice(adapters), text) for text in inputs[:limit]]
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for name, text in work:
            model = models[name]
            model.set_adapter(name)
            encoded = tokenizer(text, return_tensors="pt")
            if task == "classification":
                model(**encoded)
            else:
                output = model.generate(**encoded, max_new_tokens=32, do_sample=False)
                tokens += output.shape[1] - encoded["input_ids"].shape[1]
    seconds = time.perf_counter() - started
    return (tokens if task == "generation" else len(work)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--gen-requests", type=int, default=64)
    parser.add_argument("--lora", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    base = embedded_model_folder(Settings().cache_dir)
    store = Path(tempfile.mkdtemp(prefix="bench-store-"))
    adapters = make_adapters(base, store, args.lora, args.prefix)
    rng = random.Random(0)
    cls_texts = [text_of(rng, 16, 64) for _ in range(args.requests)]
    gen_prompts = [text_of(rng, 8, 24) for _ in range(args.gen_requests)]
    rows: list[tuple[str, str, float, str]] = []
    for batching in ("mixed", "grouped"):
        port = args.port or _free_port()
        server = start_server(store, batching, port)
        url = f"http://127.0.0.1:{port}"
        try:
            one = adapters["classification"][0]
            # Load every adapter once so the figures measure serving, not cold loads (those show in the metrics).
            warm = [{"adapter": a, "inputs": "warm up"} for a in adapters["classification"]]
            warm += [{"adapter": a, "prompt": "warm up", "max_new_tokens": 1} for a in adapters["generation"]]
            asyncio.run(drive(url, "/v1/classify", warm[:len(adapters["classification"])], 8))
            asyncio.run(drive(url, "/v1/generate", warm[len(adapters["classification"]):], 8))
            results = {}
            for label, choose in (
                ("one adapter", lambda: one),
                ("40 adapters uniform", lambda: pick(rng, adapters["classification"], False)),
                ("40 adapters zipf", lambda: pick(rng, adapters["classification"], True)),
            ):
                bodies = [{"adapter": choose(), "inputs": text} for text in cls_texts]
                seconds, _, _ = asyncio.run(drive(url, "/v1/classify", bodies, 64))
                results[label] = len(bodies) / seconds
                print(f"[{batching}] classify {label}: {results[label]:.2f} req/s", flush=True)
                rows.append((batching, f"classify {label}", results[label], "req/s"))
            rows.append((batching, "classify uniform / one adapter",
                         results["40 adapters uniform"] / results["one adapter"], "ratio"))
            gen = {}
            for label, choose in (
                ("base only", lambda: None),
                ("40 adapters uniform", lambda: pick(rng, adapters["generation"], False)),
                ("40 adapters zipf", lambda: pick(rng, adapters["generation"], True)),
            ):
                bodies = [{"adapter": choose(), "prompt": p, "max_new_tokens": 32} for p in gen_prompts]
                figures = asyncio.run(stream_generate(url, bodies, 16))
                gen[label] = figures["tok/s"]
                print(f"[{batching}] generate {label}: {gen[label]:.2f} tok/s", flush=True)
                rows.append((batching, f"generate {label}", gen[label], "tok/s"))
                rows.append((batching, f"generate {label} TTFT p50 / p99", figures["ttft p50"],
                             f"s / {figures['ttft p99']:.2f} s"))
                rows.append((batching, f"generate {label} ITL p50 / p99", figures["itl p50"],
                             f"s / {figures['itl p99']:.3f} s"))
            rows.append((batching, "generate mixed / base only", gen["40 adapters uniform"] / gen["base only"], "ratio"))
        finally:
            server.terminate()
            server.wait(timeout=60)
    loop_cls = peft_loop(base, store, adapters["classification"], "classification", cls_texts, 128)
    loop_gen = peft_loop(base, store, adapters["generation"], "generation", gen_prompts, 16)
    rows.append(("peft", "classify one at a time (set_adapter)", loop_cls, "req/s"))
    rows.append(("peft", "generate one at a time (set_adapter)", loop_gen, "tok/s"))
    mixed = {name: value for strategy, name, value, _ in rows if strategy == "mixed"}
    grouped = {name: value for strategy, name, value, _ in rows if strategy == "grouped"}
    print(f"\n{'strategy':<8} {'measure':<44} {'value':>10}  unit")
    for strategy, name, value, unit in rows:
        print(f"{strategy:<8} {name:<44} {value:>10.2f}  {unit}")
    for name in ("classify 40 adapters uniform", "generate 40 adapters uniform"):
        print(f"{'mixed/grouped':<8} {name:<44} {mixed[name] / grouped[name]:>10.2f}  ratio")
    print(f"{'mixed/peft':<8} {'classify 40 adapters uniform':<44} "
          f"{mixed['classify 40 adapters uniform'] / loop_cls:>10.2f}  ratio")
    print(f"{'mixed/peft':<8} {'generate 40 adapters uniform':<44} "
          f"{mixed['generate 40 adapters uniform'] / loop_gen:>10.2f}  ratio")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
