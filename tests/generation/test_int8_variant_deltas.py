"""Variants on a quantised engine: low-rank deltas are held as int8 factors (a quarter of float32's bytes),
a batch mixing variants adds every row's own delta (the compiled kernel and the torch int8 products agree
with the float formula), each variant keeps its own tokens in a mixed batch, and torch's int8 weight kernel
is never handed a weight whose input size would make it read past its input."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.generation import cpp_build
from workers.generation import deltas as deltas_module
from workers.generation.compact import QuantLinear
from workers.generation.deltas import (
    Int8LowRankDelta,
    Int8Stack,
    LowRankDelta,
    RowDeltas,
    build_variant,
)
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.lowrank_kernel import SOURCE, SWITCH, KernelPlan, lowrank_kernel

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> EarlyExitEngine:
    path = tmp_path_factory.mktemp("int8") / "base"
    model = make_tiny_llama(path, seed=0)
    return EarlyExitEngine(model, character_tokenizer(), device="cpu", precision="int8")


def low_rank_variant(engine: EarlyExitEngine, name: str, seed: int, rank: int = 3, scale: float = 0.3):
    """Float low-rank deltas on most projections of every layer and on the LM head."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, layer in enumerate(engine.model.model.layers):
        for module in PROJECTIONS:
            weight = layer.get_submodule(module).weight
            out, width = weight.shape
            a = torch.randn(rank, width, generator=generator) * scale / width**0.5
            b = torch.randn(out, rank, generator=generator)
            deltas[f"model.layers.{i}.{module}.weight"] = LowRankDelta(a, b, torch.float32)
    embed = engine.model.model.embed_tokens.weight
    deltas["model.embed_tokens.weight"] = LowRankDelta(
        torch.randn(rank, embed.shape[1], generator=generator) * scale,
        torch.randn(embed.shape[0], rank, generator=generator),
        torch.float32,
    )
    head = engine.model.lm_head.weight
    deltas["lm_head.weight"] = LowRankDelta(
        torch.randn(rank, head.shape[1], generator=generator) * scale / 8,
        torch.randn(head.shape[0], rank, generator=generator),
        torch.float32,
    )
    return build_variant(name, engine.compact, deltas)


def float_reference(variant, key, x: torch.Tensor, out_total: int) -> torch.Tensor:
    """Sum over the variant's parts on `key` of its (dequantised) low-rank delta of x, in float32."""
    y = torch.zeros(*x.shape[:-1], out_total)
    for part in variant.linears[key]:
        d = part.delta
        a = d.qa.float() * d.sa.float()[:, None]
        b = d.qb.float() * d.sb.float()
        y[..., part.offset : part.offset + d.out_features] += x.float() @ a.T @ b.T
    return y


def test_a_quantised_engine_holds_low_rank_deltas_as_int8_factors_at_a_quarter_of_the_bytes(engine):
    floats = low_rank_variant(engine, "v", seed=1)
    held = engine.add_variant(floats)
    parts = [p.delta for parts in held.linears.values() for p in parts]
    assert parts and all(isinstance(d, Int8LowRankDelta) for d in parts)
    assert held.bytes < floats.bytes / 3
    for key, float_parts in floats.linears.items():
        for want, got in zip(float_parts, held.linears[key], strict=True):
            exact = want.delta.b @ want.delta.a
            quantised = (got.delta.qb.float() * got.delta.sb.float()) @ (
                got.delta.qa.float() * got.delta.sa.float()[:, None]
            )
            assert (quantised - exact).norm() / exact.norm() < 0.02
    engine.remove_variant("v")


@pytest.mark.parametrize("positions", [1, 3])
def test_a_mixed_batch_adds_every_rows_own_delta_in_the_kernel_and_the_torch_products(
    engine, monkeypatch, positions
):
    v1 = engine.add_variant(low_rank_variant(engine, "v1", seed=2))
    v2 = engine.add_variant(low_rank_variant(engine, "v2", seed=3, rank=5))
    rows = [v1, None, v2, v1]
    generator = torch.Generator().manual_seed(4)
    for key in [(0, "qkv"), (1, "gate_up"), (3, "o"), (-1, "head")]:  # gate_up: only up (at an offset)
        linear = engine.compact.head if key[0] == -1 else getattr(engine.compact.layers[key[0]], key[1])
        out_total = linear.out_features
        width = v1.linears[key][0].delta.qa.shape[1]
        x = torch.randn(len(rows), positions, width, generator=generator).bfloat16()
        if key[1] == "head":
            x = x[:, 0]
        want = torch.zeros(*x.shape[:-1], out_total)
        for r, variant in enumerate(rows):
            if variant is not None:
                want[r] = float_reference(variant, key, x[r], out_total)
        got = {}
        for name, module in (("kernel", lowrank_kernel()), ("torch", None)):
            monkeypatch.setattr(deltas_module, "lowrank_kernel", lambda module=module: module)
            batch = RowDeltas(rows, torch.device("cpu"))
            y = torch.zeros(*x.shape[:-1], out_total, dtype=torch.bfloat16)
            got[name] = batch.linear(y, x, key).float()
            stack = batch._stacks[key]
            assert isinstance(stack, KernelPlan if module is not None else Int8Stack)
        assert lowrank_kernel() is not None, "the kernel builds on this machine"
        for name, y in got.items():
            torch.testing.assert_close(y, want, rtol=0.02, atol=0.02 * want.abs().max().item(), msg=name)
        assert got["kernel"][1].abs().max() == 0 and got["torch"][1].abs().max() == 0  # the base's row
    ids = torch.randint(0, 128, (len(rows), positions), generator=generator)
    want = torch.zeros(len(rows), positions, 64)
    for r, variant in enumerate(rows):
        if variant is not None:
            want[r] = variant.embed.rows(ids[r]).float()
    for module in (lowrank_kernel(), None):
        monkeypatch.setattr(deltas_module, "lowrank_kernel", lambda module=module: module)
        batch = RowDeltas(rows, torch.device("cpu"))
        got = batch.embed(torch.zeros(len(rows), positions, 64, dtype=torch.bfloat16), ids).float()
        assert (batch._embed_plan is not None) == (module is not None)
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    engine.remove_variant("v1")
    engine.remove_variant("v2")


def test_each_variant_keeps_its_own_tokens_in_a_mixed_int8_batch(engine):
    for name, seed in (("m1", 5), ("m2", 6)):
        engine.add_variant(low_rank_variant(engine, name, seed=seed, scale=2.0))
    prompts = {"m1": [5, 9, 30, 7], None: [40, 41, 42], "m2": [11, 12, 13, 14, 15]}

    def request(variant):
        return GenerationRequest(
            prompt_ids=prompts[variant], depth=4, max_new_tokens=10, ignore_eos=True, variant=variant
        )

    mixed = [f.token_ids for f in engine.run([request(v) for v in prompts])]
    alone = [engine.run([request(v)])[0].token_ids for v in prompts]
    assert mixed == alone
    base = request(None).model_copy(update={"prompt_ids": prompts["m1"]})
    assert alone[0] != engine.run([base])[0].token_ids
    engine.remove_variant("m1")
    engine.remove_variant("m2")


def test_the_int8_weight_kernel_is_not_given_an_input_size_it_would_read_past():
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(32, 24, generator=generator)
    linear = QuantLinear(weight, None, "int8")
    assert not linear.fast_int8  # 24 columns: torch's kernel reads past the input (a segmentation fault)
    x = torch.randn(4, 24, generator=generator).bfloat16()
    expected = x.float() @ linear.dequantized().T  # activations quantised per block where the CPU has VNNI
    assert (linear(x).float() - expected).norm() / expected.norm() < 1e-2
    assert QuantLinear(torch.randn(32, 32, generator=generator), None, "int8").fast_int8


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("STRATA_LOWRANK_KERNEL", "0")
    assert cpp_build.load_or_build(SOURCE, SWITCH) == (None, True)


def test_while_another_process_builds_the_kernel_torch_serves_without_waiting(monkeypatch, tmp_path):
    import fcntl

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_build, "_built", {})
    name, root = cpp_build.build_place(SOURCE)
    root.mkdir(parents=True)
    with open(root / f"{name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cpp_build.load_or_build(SOURCE, SWITCH) == (None, False)  # another builds it: not waited for
        assert lowrank_kernel() is None and str(SOURCE) not in cpp_build._built  # asked again later
    assert not (root / f"{name}.so").exists()
