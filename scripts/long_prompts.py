"""Long prompts, base only, ours against vLLM: streamed generation of 32 tokens after prompts of 150-250 words
(~230 tokens), where prefill, not decode, is most of the work.

Each round sends a fresh set of prompts, the same to both servers, so neither server's prefix cache finds
repeats; then a last round at each concurrency sends the previous round's prompts again, where both find them
all. The servers take turns, the one not measured stopped, as in ``benchmark.py --generation-only``.

    .venv/bin/python scripts/long_prompts.py --vllm-python ~/vllm-venv/bin/python [--rounds 2] [--words 150 250]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (  # noqa: E402
    curve_point,
    ours_and_vllm,
    paused,
    resumed,
    text_of,
    vllm_prefix,
)

from service.model.loading import embedded_model_folder  # noqa: E402
from service.settings import EMBEDDED_MODEL_ID, Settings  # noqa: E402

REQUESTS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, metavar="PATH")
    parser.add_argument("--rounds", type=int, default=2, choices=range(1, 100), metavar="N")
    parser.add_argument("--words", type=int, nargs=2, default=(150, 250), metavar=("LOW", "HIGH"))
    args = parser.parse_args()
    prefix = vllm_prefix(args.vllm_python)
    if prefix is None:
        parser.error(f"--vllm-python {args.vllm_python} cannot import vllm")
    base = embedded_model_folder(Settings().cache_dir)
    store = Path(tempfile.mkdtemp(prefix="long-prompts-"))
    with ours_and_vllm(store, base, [], args.vllm_python, prefix) as (server, url, peer, vllm_url):
        for concurrency in (16, 64):
            for round_ in range(args.rounds + 1):
                repeat = round_ == args.rounds
                if not repeat:
                    rng = random.Random(1000 + concurrency * 10 + round_)
                    prompts = [text_of(rng, *args.words) for _ in range(REQUESTS)]
                ours = curve_point("ours", "base only", url, prompts, concurrency, lambda: None, openai=False)
                with paused(server), resumed(peer):
                    theirs = curve_point("vllm", "base only", vllm_url, prompts, concurrency,
                                         lambda: EMBEDDED_MODEL_ID, openai=True)
                label = "repeated prompts" if repeat else f"round {round_}"
                print(f"c={concurrency} {label}: ours / vLLM {ours['tok/s'] / theirs['tok/s']:.2f} tok/s, "
                      f"TTFT p50 {ours['ttft p50']:.2f} / {theirs['ttft p50']:.2f} s, "
                      f"p99 {ours['ttft p99']:.2f} / {theirs['ttft p99']:.2f} s, ITL p99 / p50 "
                      f"{ours['itl p99'] / ours['itl p50']:.2f} / {theirs['itl p99'] / theirs['itl p50']:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
