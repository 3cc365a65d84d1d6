"""LoRA on every linear layer, mixed, ours against vLLM: 32 adapters r 8/16 on q, k, v, o, gate, up and down
(the `target_modules="all-linear"` newer tutorials use), uniform, 128 short prompts x 32 tokens streamed.

Prints, per round at 16 and 64 streams: ours mixed / ours base, ours mixed / vLLM mixed, and TTFT p99. The servers
take turns, the one not measured stopped, as in ``benchmark.py --generation-only``.

    .venv/bin/python scripts/all_linear_lora.py --vllm-python ~/vllm-venv/bin/python [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402
from peft import LoraConfig  # noqa: E402

from service.model.loading import embedded_model_folder  # noqa: E402
from service.settings import Settings  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def all_linear_config(**options: Any) -> LoraConfig:
    return LoraConfig(**{**options, "target_modules": ALL_LINEAR})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, metavar="PATH")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    prefix = benchmark.vllm_prefix(args.vllm_python)
    if prefix is None:
        parser.error(f"--vllm-python {args.vllm_python} cannot import vllm")
    benchmark.LoraConfig = all_linear_config  # make_adapters' LoRA adapters, on every linear layer
    base = embedded_model_folder(Settings().cache_dir)
    store = Path(tempfile.mkdtemp(prefix="all-linear-"))
    names = benchmark.make_adapters(base, store, 32, 0, classification=False)["generation"]
    choose = random.Random(3)
    with benchmark.ours_and_vllm(store, base, names, args.vllm_python, prefix) as (server, url, peer, vllm_url):
        for concurrency in (16, 64):
            for round_ in range(args.rounds):
                # fresh prompts each measure: re-sent, base rows would skip their prefill in the prefix cache
                rng = random.Random(f"{concurrency}-{round_}")
                prompts = [benchmark.text_of(rng, 8, 24) for _ in range(128)]
                base_only = benchmark.curve_point("ours", "base only", url, prompts, concurrency, lambda: None,
                                                  openai=False)
                mixed = benchmark.curve_point("ours", "mixed", url, prompts, concurrency,
                                              lambda: choose.choice(names), openai=False)
                with benchmark.paused(server), benchmark.resumed(peer):
                    theirs = benchmark.curve_point("vllm", "mixed", vllm_url, prompts, concurrency,
                                                   lambda: choose.choice(names), openai=True)
                print(f"c={concurrency} round {round_}: ours mixed / ours base "
                      f"{mixed['tok/s'] / base_only['tok/s']:.2f}, ours mixed / vLLM mixed "
                      f"{mixed['tok/s'] / theirs['tok/s']:.2f} ({mixed['tok/s']:.0f} / {theirs['tok/s']:.0f} tok/s), "
                      f"TTFT p99 {mixed['ttft p99']:.2f} / {theirs['ttft p99']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
