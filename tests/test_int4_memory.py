"""Int4Linear holds its weight once: after the first tinygemm call a resident layer frees its uint8 codes and keeps
only the kernel's repacked copy; whatever needs the codes (state_dict, dequantized, a device move, release_cache)
reads them back exactly; streamed layers keep their codes and drop the copy after each call.

The CUDA kernel is not available here: these tests run the same logic through PyTorch's CPU port of tinygemm
(impl="tinygemm" by name), and skip where this torch lacks it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxrt.memory import stream_blocks
from fluxrt.quant import int4
from fluxrt.quant.int4 import Int4Linear

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no CPU int4pack kernel")  # fmt: skip


def layer(k: int = 1024, n: int = 256, seed: int = 0, impl: str = "tinygemm") -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(k, n, bias=True), impl=impl)


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k, t in a.items():
        assert t.dtype == b[k].dtype and torch.equal(t, b[k]), k


@torch.inference_mode()
def test_resident_layer_frees_its_codes_and_state_dict_rebuilds_them():
    q = layer()
    before = snapshot(q)
    x = torch.randn(3, 5, 1024)
    y = q(x)
    assert q.weight is None and q._packed is not None  # one copy: the kernel's
    ref = layer(impl="reference")(x)
    assert (y - ref).norm() / ref.norm() < 5e-3  # bf16 activations and output only
    assert_same(snapshot(q), before)  # the file gets the original codes, in the original key order
    assert q.weight is not None and q._packed is None  # reading them back dropped the kernel's copy
    assert torch.equal(q(x), y) and q.weight is None  # repacked on the next call, codes freed again


def test_release_cache_gives_back_the_codes_and_drops_the_copy():
    q = layer()
    codes = q.weight.clone()
    with torch.inference_mode():
        q(torch.randn(4, 1024))
    q.release_cache()
    assert q._packed is None and torch.equal(q.weight, codes)
    q.weight.add_(0)  # an ordinary buffer again, although read back under inference mode
    q.release_cache()  # nothing cached: a no-op
    assert torch.equal(q.weight, codes)


def test_the_read_back_is_exact_for_every_code_and_chunk(monkeypatch):
    monkeypatch.setattr(int4, "_READ_COLS", 96)  # several kernel calls, the last one partial
    q = layer(k=1024, n=64)
    q.weight.copy_(torch.randint(0, 256, q.weight.shape, dtype=torch.uint8))  # every byte value
    codes = q.weight.clone()
    q(torch.randn(2, 1024))
    assert q.weight is None
    assert torch.equal(q.dequantized(), int4.dequantize_int4(codes, q.weight_scale, q.weight_zero))
    assert torch.equal(q.weight, codes)


def test_keep_codes_keeps_the_buffer_and_release_drops_the_copy():
    q = layer()
    q.keep_codes = True
    codes = q.weight
    q(torch.randn(2, 1024))
    assert q.weight is codes and q._packed is not None
    q.release_cache()
    assert q.weight is codes and q._packed is None


def test_load_state_dict_and_device_moves_after_a_call():
    q, other = layer(), layer(seed=1)
    x = torch.randn(2, 1024)
    q(x)
    q.load_state_dict(other.state_dict())  # strict: `weight` is expected and taken
    assert torch.equal(q(x), other(x))  # the stale copy of the old codes was dropped
    before = snapshot(q)
    q.to(torch.bfloat16)  # _apply: the codes come back before the move; codes and scales keep their dtypes
    after = snapshot(q)
    assert after.pop("bias").dtype == torch.bfloat16
    assert_same(after, {k: v for k, v in before.items() if k != "bias"})


def test_a_kernel_that_cannot_read_back_keeps_both_copies(monkeypatch):
    q = layer()
    monkeypatch.setattr(Int4Linear, "_read_codes", lambda self, a, b: torch.zeros_like(self.weight[:, a // 2 : b // 2]))
    with pytest.warns(UserWarning, match="keeping both copies"):
        q(torch.randn(2, 1024))
    assert q.weight is not None and q.keep_codes


class Stack(nn.Module):
    """Three int4 blocks in a row, named as stream_blocks expects."""

    def __init__(self, head: bool = False):
        super().__init__()
        self.double_blocks = nn.ModuleList(layer(k=256, n=256, seed=i) for i in range(3))
        self.head = layer(k=256, n=256, seed=7) if head else nn.Identity()

    def forward(self, x):
        for b in self.double_blocks:
            x = b(x)
        return self.head(x)


@torch.inference_mode()
def test_streamed_layers_keep_codes_and_resident_ones_free_them():
    model = Stack()
    x = torch.randn(4, 256)
    model(x)  # every layer ran resident first: codes freed, only kernel copies left
    assert all(b.weight is None for b in model.double_blocks)
    model = Stack()  # the same weights, never run
    before = snapshot(model)
    model(x)
    want = model(x)
    stream_blocks(model, "cpu", prefetch=1, resident=1)  # block 0 resident, blocks 1 and 2 streamed
    resident, streamed = model.double_blocks[0], model.double_blocks[1:]
    assert not resident.keep_codes and all(b.keep_codes and b._packed is None for b in streamed)
    assert torch.equal(model(x), want)
    assert resident.weight is None and resident._packed is not None  # resident: one copy, the kernel's
    assert all(b.weight is not None and b._packed is None for b in streamed)  # released after their call
    assert_same(snapshot(model), before)


@torch.inference_mode()
def test_non_persistent_streaming_releases_the_layers_outside_the_blocks():
    model = Stack(head=True)  # the head is outside the blocks: parked with the rest when not persistent
    x = torch.randn(2, 256)
    want = model(x)
    stream_blocks(model, "cpu", persistent=False)
    assert torch.equal(model(x), want)
    assert model.head.keep_codes and model.head.weight is not None and model.head._packed is None
