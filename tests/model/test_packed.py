"""bf16 on a CPU: the owned forward's weights are prepacked (the packed kernel's layout where the CPU has AMX or
AVX-512 BF16, else oneDNN's) and held once, and both paths still give the plain model's answers (the HF modules
compute through the packed matrices)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from service.api.app import record_memory
from service.domain import GenerationParams
from service.metrics import Metrics
from service.model.generation import generate
from service.model.loading import load_base_model
from service.model.owned.kernels import packed_matmul_available
from service.model.owned.matmul import Matmul, Packing, choose_packing
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import GenerationJob, ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore
from tests.conftest import TINY_ID

pytestmark = pytest.mark.skipif(
    choose_packing(torch.bfloat16, torch.device("cpu"), allow_kernel=False) is not Packing.ONEDNN,
    reason="this CPU build of torch has no oneDNN weight packing")


@pytest.fixture(scope="module", params=[Packing.KERNEL, Packing.ONEDNN], ids=lambda packing: packing.value)
def bf16_runner(request: pytest.FixtureRequest, tiny_base: Path) -> ModelRunner:
    if request.param is Packing.KERNEL and not packed_matmul_available():
        pytest.skip("this CPU has neither AMX nor AVX-512 BF16")
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID], dtype="bfloat16"))
    return ModelRunner(loaded, limits=CacheLimits(kernel_matmul=request.param is Packing.KERNEL))


def test_weights_are_packed_and_held_once(bf16_runner: ModelRunner, request: pytest.FixtureRequest) -> None:
    assert bf16_runner.owned is not None
    layer = bf16_runner.owned.forward.layers[0]
    wanted = request.node.callspec.params["bf16_runner"]
    assert layer.qkv.packing is layer.gate_up.packing is layer.o.packing is layer.down.packing is wanted
    q_proj = bf16_runner.base.model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.stride() == (0, 0)  # a placeholder: the dense weights were freed


def test_memory_gauges_count_the_weights_once(bf16_runner: ModelRunner, tiny_base: Path) -> None:
    metrics = Metrics(10)
    record_memory(metrics, bf16_runner)
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    plain_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())  # tied weights listed once
    counted = metrics.base_weight_bytes._value.get()
    assert 0.95 * plain_bytes <= counted <= 1.15 * plain_bytes  # packed layouts may pad a little
    assert metrics.kv_cache_budget_bytes._value.get() == bf16_runner.owned.cache.nbytes_budget()


def test_owned_generation_matches_the_plain_model(bf16_runner: ModelRunner, tiny_base: Path) -> None:
    tokenizer = bf16_runner.base.tokenizer
    prompts = ["hello there", "a second, longer prompt for the batch"]
    jobs = [GenerationJob(GenerationParams(prompt=p, max_new_tokens=8), tokenizer(p)["input_ids"]) for p in prompts]
    got = [g.text for g in generate(bf16_runner, [None, None], jobs)]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    for prompt, text in zip(prompts, got):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=8, do_sample=False)
        assert text == tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_transformers_path_through_packed_modules_matches_peft(bf16_runner: ModelRunner, tiny_store: Path,
                                                               tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    store = AdapterStore(tiny_store, bf16_runner.base.names_base)
    adapter = bf16_runner.load(store.get("lora-cls"))
    tokenizer = bf16_runner.base.tokenizer
    text = "classified through the HF modules"
    got = torch.tensor(bf16_runner.classify([adapter], [tokenizer(text)["input_ids"]])[0])
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        tiny_base, num_labels=len(adapter.info.labels), dtype=torch.bfloat16), tiny_adapters["lora-cls"]).eval()
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits.float(), -1)[0]
    assert torch.allclose(got, expected, atol=2e-2)
    bf16_runner.unload(adapter)


def test_gate_up_and_its_activation_run_as_one_kernel_with_the_same_text(bf16_runner: ModelRunner,
                                                                        store: AdapterStore,
                                                                        request: pytest.FixtureRequest,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the packed kernel, gate/up and SiLU-and-mul are one kernel in every layer no step adapter changes
    gate/up (base rows, LoRA on q/v); a LoRA on gate_proj keeps the two apart in the steps it runs in. The text is
    the same either way."""
    if request.node.callspec.params["bf16_runner"] is not Packing.KERNEL:
        pytest.skip("the fused kernel is the packed kernel's")
    assert bf16_runner.owned is not None
    forward = bf16_runner.owned.forward
    assert forward.fused_activation
    calls = []
    fused = Matmul.silu_mul
    monkeypatch.setattr(Matmul, "silu_mul", lambda self, x: calls.append(x.shape[0]) or fused(self, x))
    names = [None, "lora-gen", "lora-gen-mlp", "ia3-gen"]
    adapters = [bf16_runner.load(store.get(name)) if name else None for name in names]
    tokenizer = bf16_runner.base.tokenizer
    texts = {}
    for mode in (True, False):
        forward.fused_activation = mode
        try:
            for index, adapter in enumerate(adapters):
                jobs = [GenerationJob(GenerationParams(prompt=f"text {index}", max_new_tokens=8),
                                      tokenizer(f"text {index}")["input_ids"])]
                texts[(mode, index)] = generate(bf16_runner, [adapter], jobs)[0].text
                if mode:
                    assert bool(calls) == (names[index] in (None, "lora-gen", "ia3-gen")), names[index]
                    calls.clear()
        finally:
            forward.fused_activation = True
    for adapter in adapters:
        if adapter is not None:
            bf16_runner.unload(adapter)
    assert all(texts[(True, index)] == texts[(False, index)] for index in range(len(names)))


def test_ia3_rows_in_bf16_give_the_same_text_through_the_scaling_kernel(bf16_runner: ModelRunner,
                                                                         store: AdapterStore,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """IA3 rows beside a base row, in bf16: the in-place scaling kernel runs and gives the text the gathered torch
    multiply gives (the kernels' step ops both times; only the IA3 scaling differs)."""
    assert bf16_runner.owned is not None
    owned = bf16_runner.owned.adapters
    if not owned.kernel_lora:
        pytest.skip("the step ops are torch's here")
    adapter = bf16_runner.load(store.get("ia3-gen"))
    tokenizer = bf16_runner.base.tokenizer
    prompts = ["scaled in bf16", "and a base row beside it"]

    def texts() -> list[str]:
        jobs = [GenerationJob(GenerationParams(prompt=p, max_new_tokens=8), tokenizer(p)["input_ids"]) for p in prompts]
        return [g.text for g in generate(bf16_runner, [adapter, None], jobs)]

    calls = []
    kernel = torch.ops.adapter_service.scale_columns_
    monkeypatch.setattr(torch.ops.adapter_service, "scale_columns_", lambda *args: calls.append(1) or kernel(*args))
    try:
        in_kernel = texts()
        assert calls
        monkeypatch.setattr(owned, "kernel_lora", False)
        calls.clear()
        assert texts() == in_kernel and not calls
    finally:
        bf16_runner.unload(adapter)
