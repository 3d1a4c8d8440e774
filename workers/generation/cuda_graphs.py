"""Decode steps replayed from CUDA graphs: one captured graph per (exit depth, rows, exit adapter on/off, KV
cache).

A decode step of a small model on a GPU is bound by launching its few hundred kernels from Python, not by
the GPU. Capturing `CompactLlama.static_step` once per (depth, rows, adapter) and replaying it makes a step
one graph launch plus a few small copies into the graph's input buffers:

    ids, positions        -> the new tokens and their positions (B, 1)
    column                -> the cache column the step writes (so one graph serves every column)
    valid (B, 1, 1, C)    -> True for the cache columns a row may attend to (filled, not padding)

The captured step attends over the cache's whole capacity C under `valid`, which is exact (masked columns get
zero weight) and keeps every size fixed. A graph holds the addresses of the KV cache it was captured with,
so graphs are kept per cache, and the engine calls `forget(cache)` when it lets a cache go. Models the static
step cannot compute exactly (sliding-window layers, sparse MoE) are never captured (`CompactLlama.graphable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.generation.compact import CompactLlama, KVCache


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    cache_keys: torch.Tensor  # the cache tensor the graph reads and writes (identity checked on replay)
    ids: torch.Tensor
    positions: torch.Tensor
    column: torch.Tensor
    valid: torch.Tensor
    logits: torch.Tensor


class GraphedDecoder:
    """Replays captured decode steps of a CompactLlama on CUDA; `step` has the meaning of
    `CompactLlama.forward` for one new token per row (it advances `cache.length`)."""

    def __init__(self, compact: CompactLlama, warmup: int = 2) -> None:
        if compact.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        if not compact.graphable:
            raise ValueError("this model has layers a captured step cannot compute exactly")
        self.compact = compact
        self.warmup = warmup
        self.graphs: dict[tuple[int, int, bool, int], _Captured] = {}  # (depth, rows, adapter, cache address)
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def _capture(
        self, key: tuple[int, int, bool, int], cache: KVCache, inputs: tuple[torch.Tensor, ...]
    ) -> _Captured:
        depth, rows, adapter, _ = key
        ids, positions, column, valid = (t.clone() for t in inputs)
        compact = self.compact

        def run() -> torch.Tensor:
            return compact.static_step(ids, positions, column, valid, cache, depth, adapter)

        # Warm-up on a side stream (as capture requires); the writes it makes to the cache are the ones the
        # replay makes again (same column, same values).
        side = torch.cuda.Stream(device=compact.device)
        side.wait_stream(torch.cuda.current_stream(compact.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(compact.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.captures += 1
        return _Captured(graph, cache.keys, ids, positions, column, valid, logits)

    @torch.inference_mode()
    def step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        depth: int,
        pad_mask: torch.Tensor | None,
        exit_adapter: bool,
    ) -> torch.Tensor:
        """Logits (B, vocab) of one new token per row (B, 1) at `positions` (B, 1), appended at column
        `cache.length`; `pad_mask` (B, cache.length + 1), 1 for real tokens, or None when no row is padded."""
        rows = input_ids.shape[0]
        length = cache.length
        if length + 1 > cache.capacity or rows > cache.rows or depth > cache.depth:
            raise ValueError("the KV cache is too small for this step")
        adapter = exit_adapter and self.compact.has_adapter(depth)
        device = self.compact.device
        valid = torch.zeros(rows, 1, 1, cache.capacity, dtype=torch.bool, device=device)
        if pad_mask is None:
            valid[..., : length + 1] = True
        else:
            valid[:, 0, 0, : length + 1] = pad_mask[:, : length + 1].bool()
        column = torch.full((1,), length, dtype=torch.long, device=device)
        key = (depth, rows, adapter, cache.keys.data_ptr())  # a graph keeps its cache alive: no aliasing
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, cache, (input_ids, positions, column, valid))
            self.graphs[key] = captured
        captured.ids.copy_(input_ids)
        captured.positions.copy_(positions)
        captured.column.copy_(column)
        captured.valid.copy_(valid)
        captured.graph.replay()
        cache.length = length + 1
        return captured.logits.clone()

    def clear(self) -> None:
        """Drop every graph (the weights or adapters they read have changed)."""
        self.graphs.clear()

    def forget(self, cache: KVCache) -> None:
        """Drop the graphs captured on `cache` (about to be freed)."""
        for key in [k for k, c in self.graphs.items() if c.cache_keys is cache.keys]:
            del self.graphs[key]
