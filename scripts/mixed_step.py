"""A decode step of the owned forward in one process: base-only rows against rows spread over the benchmark's
mixed adapters (32 LoRA r 8/16 on q/v and 8 prefix, made here with PEFT), alternating, so the mixed / base ratio
of the step itself is measured without HTTP, the client or the machine's drift between two runs.

    .venv/bin/python scripts/mixed_step.py [--rows 64] [--reps 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_adapters  # noqa: E402

from service.api.app import cache_limits  # noqa: E402
from service.domain import GenerationParams  # noqa: E402
from service.model.adapters import LoadedAdapter  # noqa: E402
from service.model.generation import Engines  # noqa: E402
from service.model.loading import embedded_model_folder, load_base_model  # noqa: E402
from service.model.runner import GenerationJob, ModelRunner  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store.store import AdapterStore  # noqa: E402


def step_ms(runner: ModelRunner, jobs: list[GenerationJob], adapters: list[LoadedAdapter] | None,
            steps: int) -> tuple[float, int]:
    """Mean time of a decode step once every row's prompt is in (rows round-robin over the adapters), and the rows
    still running at the end (a row that ends early leaves a smaller batch)."""
    engines = Engines(runner)
    with torch.inference_mode():
        engines.step([(index, adapters[index % len(adapters)] if adapters else None, job)
                      for index, job in enumerate(jobs)])
        while engines.owned._waiting or any(row.prefilling for row in engines.owned._rows):
            engines.step()
        for _ in range(3):
            engines.step()
        start = time.perf_counter()
        for _ in range(steps):
            engines.step()
        elapsed = (time.perf_counter() - start) / steps * 1000
        running = engines.owned.active
        engines.owned.abort()
    return elapsed, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    settings = Settings()
    store_dir = Path(tempfile.mkdtemp(prefix="mixed-step-"))
    names = make_adapters(embedded_model_folder(settings.cache_dir), store_dir, 32, 8, classification=False)
    limits = cache_limits(settings)
    if args.rows > limits.slots:
        parser.error(f"--rows {args.rows}: the cache has {limits.slots} slots (SERVICE_MAX_BATCH_SIZE)")
    runner = ModelRunner(load_base_model(settings), limits=limits)
    store = AdapterStore(store_dir)
    adapters = [runner.load(store.get(name)) for name in names["generation"]]
    # Continuations rather than chat turns, so rows run on instead of ending at an early end of sequence.
    params = [GenerationParams(prompt=f"Chapter {index}. The dragon flew over the mountains, and", max_new_tokens=300)
              for index in range(args.rows)]
    jobs = [GenerationJob(p, runner.encode_prompt(p, 2048)) for p in params]
    base, mixed = [], []
    for _ in range(args.reps):
        base_ms, base_rows = step_ms(runner, jobs, None, args.steps)
        mixed_ms, mixed_rows = step_ms(runner, jobs, adapters, args.steps)
        base.append(base_ms)
        mixed.append(mixed_ms)
        print(f"base {base_ms:.1f} ms ({base_rows} rows), mixed {mixed_ms:.1f} ms ({mixed_rows} rows)", flush=True)
    print(f"{args.rows} rows: base {statistics.median(base):.1f} ms, mixed {statistics.median(mixed):.1f} ms a step; "
          f"mixed / base throughput {statistics.median(base) / statistics.median(mixed):.2f}")


if __name__ == "__main__":
    main()
