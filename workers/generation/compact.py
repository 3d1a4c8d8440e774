"""A decode-oriented copy of a LLaMA-layout model: fused projections, one weight precision, static KV cache.

For new tokens x (B rows, q positions each) at exit depth k, with the cache holding T columns already:

    h_0 = Embed(x)
    for i in 1..k:
        a   = RMSNorm_i(h);  [Q K V] = a W_qkv^T (+ b_qkv);  Q, K = RoPE(Q, K; positions)
        K_i[:, :, T:T+q], V_i[:, :, T:T+q] = K, V
        h   = h + Attention(Q, K_i[.., :T+q], V_i[.., :T+q]; mask) W_o^T
        a   = RMSNorm'_i(h);  [G U] = a W_gu^T;  h = h + (SiLU(G) * U) W_down^T
    logits = LMHead(s_k FinalNorm(A_k h + b_k))     (A_k, b_k, s_k: the exit adapter, where the model has one)

which is what Hugging Face's LlamaDecoderLayer computes, with q/k/v and gate/up fused into one matmul each
and the rotary embedding applied to Q and K together. Weights are taken from a loaded transformers model
(Llama, Mistral, Qwen2) and kept in one precision:

- float32: F.linear on float32 weights and activations (greedy output equals Hugging Face's);
- bfloat16: bfloat16 weights and activations;
- int8: int8 weights, one scale per output channel (w = s_o * q_oi, q in [-127, 127]), bfloat16
  activations. On a CPU with AVX-512 VNNI the matmul quantises the activations to int8 per block of 16
  inputs and multiplies integers, as llama.cpp's Q8_0 does (workers.generation.decode_kernel); on other
  CPUs torch's int8 weight-only kernel; elsewhere the weights are dequantised per call;
- int4: asymmetric, one scale and minimum per group of 32 inputs (w = s_g * q + m_g, q in [0, 15]; GGUF's
  Q4_1), bfloat16 activations; with VNNI (input sizes divisible by 64) activations quantised per block and
  integer products as for int8, else torch's weight-only int4 CPU kernel;
- int8_dynamic: int8 weights and activations quantised per call (fbgemm's dynamic linear), float32 outside.

A sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE) runs as transformers' own module, unquantised, in
the activation dtype.

The KV cache is preallocated for (depth, rows, capacity) and reused: a step writes its new columns in place
and attends over the filled prefix. On the CPU keys, values and attention are float32 whatever the weight
precision (bfloat16 attention is several times slower there); elsewhere they are in the activation dtype.
On the CPU, rows without variant deltas run all their layers in one compiled call
(decode_kernels.cpp's Stack: the same torch operations in the same order, so the same numbers).
Nothing here knows about requests, batching policy or Redis.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from workers.early_exit.adapters import ExitAdapters
from workers.early_exit.forward import decoder_stack
from workers.generation.decode_kernel import decode_kernel, decode_kernel_decided, vnni_kernel
from workers.generation.deltas import RowDeltas, int8_kernel_fits

Precision = Literal["float32", "bfloat16", "int8", "int4", "int8_dynamic"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "int8", "int4", "int8_dynamic")
ACTIVATION_DTYPE = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int8": torch.bfloat16,
    "int4": torch.bfloat16,
    "int8_dynamic": torch.float32,
}
INT4_GROUP = 32


def layer_mask_kinds(config, depth: int) -> list[str]:
    """Attention kind of layers 1..depth: config.layer_types when present, else sliding iff sliding_window."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds[:depth])
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * depth


class QuantLinear:
    """y = x W^T (+ b) with W stored in one precision; `bytes` is what one call reads of the weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: Precision) -> None:
        weight = weight.detach()
        dtype = ACTIVATION_DTYPE[precision]
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.precision = precision
        self.kernel = None  # the compiled int8/int4 products (workers.generation.decode_kernel), where used
        if precision == "int8_dynamic":
            w = weight.float().cpu()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            qweight = torch.quantize_per_channel(
                w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.weight, self.scale = qweight, scale
            self.bytes = w.numel() + scale.numel() * 4
        elif precision == "int4":
            self._quantize_int4(weight.float(), dtype)
        elif precision == "int8":
            w = weight.float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            self.weight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(dtype)
            self.fast_int8 = int8_kernel_fits(weight.device, self.in_features)
            # activations quantised per block (VNNI) where this CPU has it: see the module's text
            self.kernel = vnni_kernel() if weight.device.type == "cpu" and dtype is torch.bfloat16 else None
            self.bytes = self.weight.numel() + self.scale.numel() * self.scale.element_size()
        else:
            self.weight = weight.to(dtype).contiguous()
            self.bytes = self.weight.numel() * self.weight.element_size()
        if self.bias is not None:
            self.bytes += self.bias.numel() * self.bias.element_size()

    def _quantize_int4(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        n, k = w.shape
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {k}")
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low) / scale).round().clamp(0, 15)
        codes = q.reshape(n, k).to(torch.uint8)
        # torch's kernel computes w = (q - 8) * scale + zero, so zero = minimum + 8 * scale
        kernel = vnni_kernel() if w.device.type == "cpu" and dtype is torch.bfloat16 and k % 64 == 0 else None
        self.kernel = kernel
        if kernel is not None:  # activations quantised per block too (VNNI): see the module's text
            self.weight = kernel.int4_pack(codes.contiguous())
            zero = (low + 8 * scale)[..., 0]  # torch's form, kept in bfloat16 as there
            self.scales_zeros = torch.stack([scale[..., 0], zero]).to(dtype).contiguous()  # (2, n, groups)
            self.fast_int4 = False
            self.bytes = n * k // 2 + self.scales_zeros.numel() * self.scales_zeros.element_size()
            return
        params = torch.stack([scale[..., 0], (low + 8 * scale)[..., 0]], dim=-1)  # (n, groups, 2)
        self.scales_zeros = params.transpose(0, 1).contiguous().to(dtype)
        self.fast_int4 = w.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        if self.fast_int4:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:
            self.weight = codes
        self.bytes = n * k // 2 + self.scales_zeros.numel() * self.scales_zeros.element_size()

    def compiled_form(self) -> tuple[int, torch.Tensor, torch.Tensor | None] | None:
        """(kind, weight, scales) of this linear for decode_kernels.cpp's Stack, which computes it as
        `__call__` does: 0 F.linear, 1 the VNNI int8 kernel, 2 torch's int8 kernel, 3 torch's int4 kernel,
        4 the VNNI int4 kernel;
        None for a form it does not take."""
        if self.precision in ("float32", "bfloat16"):
            return 0, self.weight, None
        if self.precision == "int8" and self.kernel is not None:
            return 1, self.weight, self.scale
        if self.precision == "int8" and self.fast_int8:
            return 2, self.weight, self.scale
        if self.precision == "int4" and self.kernel is not None:
            return 4, self.weight, self.scales_zeros
        if self.precision == "int4" and self.fast_int4:
            return 3, self.weight, self.scales_zeros
        return None

    def dequantized(self) -> torch.Tensor:
        """The weights this linear multiplies by, in float32."""
        if self.precision == "int8_dynamic":
            return self.weight.dequantize()
        if self.precision == "int4" and self.kernel is not None:
            n, k = self.out_features, self.in_features
            codes = []
            for start in range(0, k, 128):  # int4_pack's layout: see decode_kernels.cpp
                half = min(64, (k - start) // 2)
                block = self.weight[:, start // 2 : start // 2 + half]
                codes += [block & 15, block >> 4]
            scale, zero = self.scales_zeros.float()  # (n, groups) each
            q = torch.cat(codes, 1).float().reshape(n, k // INT4_GROUP, INT4_GROUP) - 8
            return (q * scale[..., None] + zero[..., None]).reshape(n, k)
        if self.precision == "int4" and self.fast_int4:  # the kernel applied to the identity: W^T
            eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype, device=self.scales_zeros.device)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.weight, INT4_GROUP, self.scales_zeros
            ).T.float()
        if self.precision == "int4":
            n, k = self.weight.shape
            scale, zero = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # (n, groups) each
            codes = self.weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP) - 8
            return (codes * scale[..., None] + zero[..., None]).reshape(n, k)
        if self.precision == "int8":
            return self.weight.float() * self.scale.float()[:, None]
        return self.weight.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "int8_dynamic":
            y = torch.ops.quantized.linear_dynamic(x, self.packed, True)
            return y if self.bias is None else y + self.bias
        if self.precision in ("float32", "bfloat16"):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])  # the packed products take matrices
        if self.precision == "int4" and self.kernel is not None:
            y = self.kernel.int4_mm(flat, self.weight, self.scales_zeros)
        elif self.precision == "int4" and self.fast_int4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP, self.scales_zeros)
        elif self.precision == "int8" and self.kernel is not None:
            y = self.kernel.int8_mm(flat, self.weight, self.scale)
        elif self.precision == "int8" and self.fast_int8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
            return y if self.bias is None else y + self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@dataclass
class CompactLayer:
    input_norm: torch.Tensor
    qkv: QuantLinear
    o: QuantLinear
    post_norm: torch.Tensor
    gate_up: QuantLinear | None
    down: QuantLinear | None
    moe: nn.Module | None = None  # a sparse mixture-of-experts MLP, in place of gate_up and down

    @property
    def mlp_bytes(self) -> int:
        if self.moe is not None:
            return sum(p.numel() * p.element_size() for p in self.moe.parameters())
        assert self.gate_up is not None and self.down is not None
        return self.gate_up.bytes + self.down.bytes


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat(
        [linear.bias if linear.bias is not None else torch.zeros(linear.out_features) for linear in linears]
    )


class KVCache:
    """Keys and values of `depth` layers for up to `rows` rows and `capacity` positions, preallocated.

    `length` columns are filled (the same for every row: rows are left-padded to a common width).
    """

    def __init__(
        self, depth: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype, device
    ) -> None:
        shape = (depth, rows, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.depth, self.rows, self.capacity = depth, rows, capacity
        self.length = 0

    def fits(self, depth: int, rows: int, capacity: int, dtype: torch.dtype) -> bool:
        roomy = self.rows >= rows and self.capacity >= capacity
        return roomy and self.depth == depth and self.keys.dtype == dtype

    def keep_rows(self, keep: list[int]) -> None:
        """Move rows `keep` (in order) to the front; later rows become free."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.keys.device)
        n, t = len(keep), self.length
        self.keys[:, :n, :, :t] = self.keys[:, index, :, :t]
        self.values[:, :n, :, :t] = self.values[:, index, :, :t]

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` positions (padding no row needs), shifting the rest left."""
        if columns <= 0:
            return
        t = self.length
        self.keys[:, :, :, : t - columns] = self.keys[:, :, :, columns:t].clone()
        self.values[:, :, :, : t - columns] = self.values[:, :, :, columns:t].clone()
        self.length = t - columns


def tensors_of(root: object) -> list[torch.Tensor]:
    """The tensors reachable from `root` through attributes, containers and modules (their parameters and
    buffers)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif id(obj) in seen or isinstance(obj, ModuleType):  # a compiled kernel's module holds no weights
            return
        elif isinstance(obj, nn.Module):
            seen.add(id(obj))
            found.extend(obj.parameters())
            found.extend(obj.buffers())
        elif isinstance(obj, list | tuple | set):
            seen.add(id(obj))
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            seen.add(id(obj))
            for item in obj.values():
                walk(item)
        elif hasattr(obj, "__dict__"):
            seen.add(id(obj))
            for item in vars(obj).values():
                walk(item)

    walk(root)
    return found


class LayerSource(Protocol):
    """Brings a decoder layer's tensors in before the compact model copies them, and lets them go after
    (workers.generation.streamed_load)."""

    def load(self, index: int, layer: nn.Module) -> None: ...

    def done(self, layer: nn.Module, kept: list[torch.Tensor]) -> None: ...


class CompactLlama:
    """The weights of a LLaMA-layout causal LM in one precision, and its cached forward step at any exit."""

    def __init__(
        self,
        model: nn.Module,
        precision: Precision = "float32",
        adapters: ExitAdapters | None = None,
        source: LayerSource | None = None,
    ) -> None:
        """`source`: where the layers' tensors come from when the model holds them only one at a time."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        inner = decoder_stack(model)
        config = inner.config
        self.precision: Precision = precision
        self.dtype = ACTIVATION_DTYPE[precision]
        self.device = next(model.parameters()).device
        # keys, values and attention: float32 on the CPU, where bfloat16 attention is several times slower
        # (a 256-column decode step: 107 us against 15 us here); the activation dtype elsewhere
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.num_layers = len(inner.layers)
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.eps = float(config.rms_norm_eps)
        self.scale = getattr(inner.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        kinds = layer_mask_kinds(config, self.num_layers)
        self.window = getattr(config, "sliding_window", None)
        self.sliding = [kind == "sliding_attention" for kind in kinds[: self.num_layers]]
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"the compact engine supports SiLU MLPs, not {config.hidden_act!r}")
        self.rotary = inner.rotary_emb
        self.embed_weight = inner.embed_tokens.weight.detach()
        self.final_norm = inner.norm.weight.detach().to(self.dtype)
        head = model.lm_head
        self.tied_head = head.weight is inner.embed_tokens.weight  # a variant's embedding delta is its head's
        self.head = QuantLinear(head.weight, head.bias, precision)
        self.layers = []
        for index, layer in enumerate(inner.layers):
            if source is not None:
                source.load(index, layer)
            self.layers.append(self._layer(layer))
            if source is not None:
                source.done(layer, tensors_of(self.layers[-1]))
        self.adapters = adapters.to(self.device, self.dtype) if adapters is not None else None
        self._stack: object | None = None  # the layers' compiled call (`_compiled_stack`), made at first use
        self._stack_made = False

    def _compiled_stack(self) -> object | None:
        """The decoder layers as one compiled call (decode_kernels.cpp's Stack) where every layer's parts
        have a form it computes exactly as `_block` does (CPU, no MoE; float, int8 or int4 matrices); else
        None."""
        if self._stack_made:
            return self._stack
        module = decode_kernel() if self.device.type == "cpu" else None
        if module is None and self.device.type == "cpu" and not decode_kernel_decided():
            return None  # being built by another process: asked again at the next step
        self._stack_made = True
        if module is None or any(layer.moe is not None for layer in self.layers):
            return None
        norms: list[torch.Tensor] = []
        tensors: list[torch.Tensor] = []
        kinds: list[int] = []
        empty = torch.empty(0)
        for layer in self.layers:
            norms += [layer.input_norm, layer.post_norm]
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                assert linear is not None
                form = linear.compiled_form()
                if form is None:
                    return None
                kind, weight, scale = form
                bias = linear.bias if linear.bias is not None else empty
                tensors += [weight, scale if scale is not None else empty, bias]
                kinds += [kind, linear.out_features]
        self._stack = module.Stack(
            norms,
            tensors,
            kinds,
            self.sliding,
            self.num_heads,
            self.kv_heads,
            self.head_dim,
            self.eps,
            float(self.scale),
            self.dtype,
            self.kv_dtype,
        )
        return self._stack

    def _layer(self, layer: nn.Module) -> CompactLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        p = self.precision
        moe, gate_up, down = None, None, None
        if hasattr(mlp, "gate_proj"):
            weights = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            gate_up = QuantLinear(weights, _cat_bias(mlp.gate_proj, mlp.up_proj), p)
            down = QuantLinear(mlp.down_proj.weight, mlp.down_proj.bias, p)
        else:  # a sparse MoE block (Mixtral, Qwen2-MoE): transformers' own module, unquantised, in the
            # activation dtype (a copy when that differs, so the loaded model is left as it is)
            moe = mlp if next(mlp.parameters()).dtype == self.dtype else copy.deepcopy(mlp).to(self.dtype)
        return CompactLayer(
            input_norm=layer.input_layernorm.weight.detach().to(self.dtype),
            qkv=QuantLinear(qkv, _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj), p),
            o=QuantLinear(attn.o_proj.weight, attn.o_proj.bias, p),
            post_norm=layer.post_attention_layernorm.weight.detach().to(self.dtype),
            gate_up=gate_up,
            down=down,
            moe=moe,
        )

    def has_adapter(self, depth: int) -> bool:
        return self.adapters is not None and self.adapters.has(depth)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this model computes with (its own quantised or fused copies, and what it shares
        with the source model: embeddings, norms, same-precision matrices, MoE modules, rotary buffers)."""
        return tensors_of(self)

    def weight_bytes(self, depth: int) -> int:
        """Weight bytes a decode step at `depth` reads: layers 1..k and the head (one embedding row aside)."""
        per_layer = [lay.qkv.bytes + lay.o.bytes + lay.mlp_bytes for lay in self.layers]
        return sum(per_layer[:depth]) + self.head.bytes

    def new_cache(self, depth: int, rows: int, capacity: int) -> KVCache:
        return KVCache(depth, rows, self.kv_heads, capacity, self.head_dim, self.kv_dtype, self.device)

    def _norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        deltas: RowDeltas | None = None,
        key: tuple[int, str] = (-1, "final"),
    ) -> torch.Tensor:
        rows = deltas.norm_weight(key, weight) if deltas is not None else None
        if rows is None or rows.dim() == 1:  # the base's weights, or every row's variant's own
            return F.rms_norm(x, (x.shape[-1],), weight if rows is None else rows, self.eps)
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * (rows if x.dim() == 3 else rows[:, 0])

    def _linear(
        self, linear: QuantLinear, x: torch.Tensor, deltas: RowDeltas | None, key: tuple[int, str]
    ) -> torch.Tensor:
        """The base's linear for every row, plus the rows' variant deltas (workers.generation.deltas)."""
        y = linear(x)
        return y if deltas is None else deltas.linear(y, x, key)

    def _masks(
        self, pad_mask: torch.Tensor | None, q: int, total: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(full, sliding) boolean masks (B, 1, q, total); None where plain causal attention is exact."""
        needs_window = self.window is not None and any(self.sliding) and total > self.window
        if pad_mask is None and q == 1 and not needs_window:
            return None, None
        device = self.device
        query_pos = torch.arange(total - q, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        causal = key_pos <= query_pos
        full = causal[None, None]
        if pad_mask is not None:
            full = full & pad_mask[:, None, None, :total].bool()
        sliding = full & (key_pos > query_pos - self.window)[None, None] if needs_window else full
        return full, sliding

    def embed(self, input_ids: torch.Tensor, deltas: RowDeltas | None = None) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed_weight).to(self.dtype)
        return hidden if deltas is None else deltas.embed(hidden, input_ids)

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for RoPE at `positions` (B, q), shaped (B, q, 1, head_dim); sin carries the sign of
        rotate_half, so RoPE(x) = x cos + roll(x, head_dim / 2) sin."""
        cos, sin = self.rotary(hidden, position_ids=positions)
        half = self.head_dim // 2
        sin = sin.to(self.dtype)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos.to(self.dtype)[:, :, None, :], sin[:, :, None, :]

    @torch.inference_mode()
    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        start: int,
        stop: int,
        column: int,
        pad_mask: torch.Tensor | None = None,
        deltas: RowDeltas | None = None,
    ) -> torch.Tensor:
        """Hidden states after layers start+1..stop for inputs (B, q, H) at `positions` (B, q), writing their
        keys and values at cache columns column..column+q-1 and attending over columns < column + q.
        `pad_mask` (B, column + q), 1 for real tokens, or None when no row is padded; `deltas`: the rows'
        variants of this base (None: every row is the base)."""
        rows, q = hidden.shape[:2]
        total = column + q
        if total > cache.capacity or rows > cache.rows or stop > cache.depth:
            raise ValueError("the KV cache is too small for this step")
        cos, sin = self.rope(hidden, positions)
        full_mask, sliding_mask = self._masks(pad_mask, q, total)
        causal = full_mask is None and q > 1 and column == 0
        stack = self._compiled_stack() if deltas is None else None
        if stack is not None:
            return stack.run(
                hidden,
                cos,
                sin,
                cache.keys,
                cache.values,
                start,
                stop,
                column,
                full_mask,
                sliding_mask,
                causal,
            )
        for i in range(start, stop):
            keys, values = cache.keys[i, :rows], cache.values[i, :rows]

            def store(new_keys: torch.Tensor, new_values: torch.Tensor, keys=keys, values=values):
                keys[:, :, column:total] = new_keys
                values[:, :, column:total] = new_values
                return keys[:, :, :total], values[:, :, :total]

            mask = sliding_mask if self.sliding[i] else full_mask
            hidden = self._block(i, hidden, cos, sin, store, mask, causal, deltas)
        return hidden

    def _block(
        self,
        i: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        store: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
        causal: bool,
        deltas: RowDeltas | None = None,
    ) -> torch.Tensor:
        """Decoder layer i on hidden (B, q, H); `store(keys, values)` ((B, kv_heads, q, head_dim) each) writes
        the new keys and values to the cache and returns the keys and values to attend over."""
        layer = self.layers[i]
        rows, q = hidden.shape[:2]
        nh, kvh, hd, half = self.num_heads, self.kv_heads, self.head_dim, self.head_dim // 2
        normed = self._norm(hidden, layer.input_norm, deltas, (i, "input"))
        qkv = self._linear(layer.qkv, normed, deltas, (i, "qkv")).view(rows, q, nh + 2 * kvh, hd)
        qk = qkv[:, :, : nh + kvh]
        qk = qk * cos + qk.roll(half, dims=-1) * sin
        kv = self.kv_dtype
        new_keys, new_values = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + kvh :].transpose(1, 2)
        keys, values = store(new_keys.to(kv), new_values.to(kv))
        attn = F.scaled_dot_product_attention(
            qk[:, :, :nh].transpose(1, 2).to(kv),
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=kvh != nh,
        )
        attn = attn.transpose(1, 2).reshape(rows, q, nh * hd).to(self.dtype)
        hidden = hidden + self._linear(layer.o, attn, deltas, (i, "o"))
        mlp_in = self._norm(hidden, layer.post_norm, deltas, (i, "post"))
        if layer.moe is not None:
            out = layer.moe(mlp_in)
            return hidden + (out[0] if isinstance(out, tuple) else out)
        gate, up = self._linear(layer.gate_up, mlp_in, deltas, (i, "gate_up")).chunk(2, dim=-1)
        return hidden + self._linear(layer.down, F.silu(gate) * up, deltas, (i, "down"))

    @property
    def graphable(self) -> bool:
        """Whether `static_step` computes this model exactly: no sliding-window layers, no MoE (its routing
        depends on data in a way a captured graph cannot follow)."""
        no_window = self.window is None or not any(self.sliding)
        return no_window and all(layer.moe is None for layer in self.layers)

    def static_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        column: torch.Tensor,
        valid: torch.Tensor,
        cache: KVCache,
        depth: int,
        exit_adapter: bool,
    ) -> torch.Tensor:
        """One decode step with every size fixed, for capture in a CUDA graph: logits (B, vocab) of tokens
        (B, 1) at `positions` (B, 1); their keys and values go to cache column `column` (a one-element long
        tensor, so the same graph serves every column), and attention runs over the whole cache capacity with
        `valid` (B, 1, 1, capacity), True for filled non-padding columns (the new one included). Does not
        advance `cache.length`."""
        rows = input_ids.shape[0]
        hidden = self.embed(input_ids)
        cos, sin = self.rope(hidden, positions)
        for i in range(depth):
            keys, values = cache.keys[i, :rows], cache.values[i, :rows]

            def store(new_keys: torch.Tensor, new_values: torch.Tensor, keys=keys, values=values):
                keys.index_copy_(2, column, new_keys)
                values.index_copy_(2, column, new_values)
                return keys, values

            hidden = self._block(i, hidden, cos, sin, store, valid, False)
        return self.logits(hidden[:, -1], depth, exit_adapter)

    @torch.inference_mode()
    def residuals(self, input_ids: torch.Tensor, exits: list[int]) -> dict[int, torch.Tensor]:
        """The residual stream h_k after each exit k in `exits` for whole sequences (B, T), from one pass
        (a scratch cache), in this model's precision: what per-precision quality is measured on."""
        wanted = sorted(set(exits))
        if not wanted or wanted[0] < 1 or wanted[-1] > self.num_layers:
            raise ValueError(f"exits must lie in 1..{self.num_layers}, got {wanted}")
        rows, length = input_ids.shape
        cache = self.new_cache(wanted[-1], rows, length)
        positions = torch.arange(length, device=self.device)[None].expand(rows, -1)
        hidden, done, out = self.embed(input_ids), 0, {}
        for depth in wanted:
            hidden = self.run_layers(hidden, positions, cache, done, depth, 0)
            out[depth], done = hidden, depth
        return out

    @torch.inference_mode()
    def logits(
        self,
        hidden: torch.Tensor,
        depth: int,
        exit_adapter: bool = True,
        deltas: RowDeltas | None = None,
        adapters: ExitAdapters | None = None,
    ) -> torch.Tensor:
        """float32 logits LMHead(FinalNorm(h)) of hidden states at exit `depth` (through its adapter,
        LMHead(s_k FinalNorm(A_k h + b_k)), when there is one and `exit_adapter`). `adapters`: exit adapters
        to use instead of the model's (a variant's own, already on the device in the activation dtype)."""
        adapters = adapters if adapters is not None else self.adapters

        def final_norm(h: torch.Tensor) -> torch.Tensor:
            return self._norm(h, self.final_norm, deltas, (-1, "final"))

        if exit_adapter and adapters is not None:
            head_in = adapters.head_input(hidden, depth, final_norm)
        else:
            head_in = final_norm(hidden)
        return self._linear(self.head, head_in, deltas, (-1, "head")).float()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        depth: int,
        pad_mask: torch.Tensor | None = None,
        exit_adapter: bool = True,
        last_only: bool = True,
        deltas: RowDeltas | None = None,
        adapters: ExitAdapters | None = None,
    ) -> torch.Tensor:
        """Logits for new tokens (B, q) at exit `depth`, appending their KV to `cache` at column
        `cache.length`. `pad_mask` (B, cache.length + q), 1 for real tokens, or None when no row is padded.
        Returns (B, vocab) logits of the last position, or (B, q, vocab) with `last_only=False`. `deltas`,
        `adapters`: the rows' variants and their exit adapters (see `run_layers`, `logits`)."""
        hidden = self.hidden_states(input_ids, positions, cache, depth, pad_mask, deltas)
        return self.logits(hidden[:, -1] if last_only else hidden, depth, exit_adapter, deltas, adapters)

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        depth: int,
        pad_mask: torch.Tensor | None = None,
        deltas: RowDeltas | None = None,
    ) -> torch.Tensor:
        """The residual stream (B, q, d) at exit `depth` for new tokens (B, q), appending their KV to `cache`
        (what `forward` reads its logits from)."""
        hidden = self.embed(input_ids, deltas)
        hidden = self.run_layers(hidden, positions, cache, 0, depth, cache.length, pad_mask, deltas)
        cache.length += input_ids.shape[1]
        return hidden
