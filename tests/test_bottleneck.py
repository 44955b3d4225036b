"""The bottleneck module: shapes, parameter count, near-identity init (src/adaptune/core/bottleneck.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptune import AdapterConfig, Bottleneck
from adaptune.cpu import kernels
from adaptune.cpu import native


@pytest.mark.parametrize("d,m", [(32, 8), (32, 64), (384, 64), (5, 1)])
def test_parameter_count_is_2md_plus_d_plus_m(d, m):
    b = Bottleneck(d, AdapterConfig(size=m))
    assert sum(p.numel() for p in b.parameters()) == 2 * m * d + d + m
    assert b.down.weight.shape == (m, d) and b.down.bias.shape == (m,)
    assert b.up.weight.shape == (d, m) and b.up.bias.shape == (d,)


def test_keeps_the_hidden_shape():
    b = Bottleneck(32, AdapterConfig(size=8))
    x = torch.randn(3, 7, 32)
    assert b(x).shape == (3, 7, 32)
    assert b(x.reshape(21, 32)).shape == (21, 32)  # any leading dims (OPT flattens tokens)


def test_init_is_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    std = 1e-2
    b = Bottleneck(256, AdapterConfig(size=128, init_std=std))
    for lin in (b.down, b.up):
        w = lin.weight
        assert torch.count_nonzero(lin.bias) == 0
        assert w.abs().max() <= 2 * std  # cut at 2 std
        # A normal truncated at +-2 std has std ~0.88 sigma; 32k samples pin it well.
        assert 0.8 * std < w.std().item() < 0.95 * std
        assert abs(w.mean().item()) < 0.02 * std


def test_init_std_scales_the_weights():
    torch.manual_seed(0)
    small = Bottleneck(64, AdapterConfig(size=64, init_std=1e-3)).down.weight.std().item()
    large = Bottleneck(64, AdapterConfig(size=64, init_std=1e-1)).down.weight.std().item()
    assert 50 < large / small < 200


def test_zero_init_outputs_exact_zeros():
    b = Bottleneck(32, AdapterConfig(size=8, init_std=0.0))
    assert torch.count_nonzero(b.down.weight) == 0 and torch.count_nonzero(b.up.weight) == 0
    assert torch.equal(b(torch.randn(2, 5, 32)), torch.zeros(2, 5, 32))


def test_fresh_adapter_is_small_but_not_zero():
    torch.manual_seed(0)
    b = Bottleneck(32, AdapterConfig(size=64))  # default init_std 1e-2
    x = torch.randn(4, 9, 32)
    y = b(x)
    assert torch.count_nonzero(y) > 0
    assert y.norm() < 1e-2 * x.norm()  # h + y stays close to h: near-identity


def test_reset_parameters_reinitialises():
    torch.manual_seed(0)
    b = Bottleneck(32, AdapterConfig(size=8, init_std=0.5))
    b.reset_parameters(0.0)
    assert torch.count_nonzero(b.down.weight) == 0 and torch.count_nonzero(b.up.weight) == 0


ACTS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "identity": lambda t: t}


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("scale", [1.0, 4.0, -0.5])
def test_forward_is_scale_times_up_act_down(act, scale):
    torch.manual_seed(0)
    b = Bottleneck(16, AdapterConfig(size=4, nonlinearity=act, init_std=0.5, scale=scale))
    with torch.no_grad():
        b.down.bias.normal_()
        b.up.bias.normal_()
    x = torch.randn(2, 3, 16)
    expected = scale * (ACTS[act](x @ b.down.weight.T + b.down.bias) @ b.up.weight.T + b.up.bias)
    torch.testing.assert_close(b(x), expected)


def test_nonlinearity_matters():
    torch.manual_seed(0)
    relu = Bottleneck(16, AdapterConfig(size=4, nonlinearity="relu", init_std=0.5))
    ident = Bottleneck(16, AdapterConfig(size=4, nonlinearity="identity", init_std=0.5))
    ident.load_state_dict(relu.state_dict())
    x = torch.randn(2, 3, 16)
    assert not torch.allclose(relu(x), ident(x))


def test_gradients_reach_both_projections():
    torch.manual_seed(0)
    b = Bottleneck(16, AdapterConfig(size=4))
    b(torch.randn(2, 3, 16)).pow(2).sum().backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("scale,parallel", [(1.0, False), (4.0, True), (-0.5, False)])
def test_fused_add_equals_h_plus_adapter_with_gradients(scale, parallel):
    """add_to (one addmm + in-place bias) == h + b(x), values and gradients (float tolerance)."""
    torch.manual_seed(0)
    b = Bottleneck(16, AdapterConfig(size=4, init_std=0.5, scale=scale))
    h = torch.randn(3, 5, 16, requires_grad=True)
    x = torch.randn(3, 5, 16, requires_grad=True) if parallel else None
    fused = b.add_to(h, x)
    plain = h + b(h if x is None else x)
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    leaves = [h, *b.parameters()] + ([x] if parallel else [])
    torch.testing.assert_close(torch.autograd.grad(fused, leaves, g), torch.autograd.grad(plain, leaves, g))


@pytest.mark.parametrize("act", ["gelu", "relu", "tanh", "silu", "identity"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("frozen", ["none", "adapter", "input"])
def test_one_node_backward_equals_autograd_of_the_plain_ops(act, parallel, frozen):
    """The hand-written backward of add_to gives autograd's gradients of h + b(x) for every
    nonlinearity, both modes, and when the adapter or the hidden state needs no gradient."""
    torch.manual_seed(1)
    b = Bottleneck(16, AdapterConfig(size=4, init_std=0.5, nonlinearity=act, scale=2.0))
    h = torch.randn(3, 5, 16, requires_grad=frozen != "input")
    x = torch.randn(3, 5, 16, requires_grad=frozen != "input") if parallel else None
    if frozen == "adapter":
        b.requires_grad_(False)
    fused = b.add_to(h, x)
    assert fused.grad_fn is not None and "AddBottleneck" in type(fused.grad_fn).__name__
    plain = h + b(h if x is None else x)
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    leaves = [t for t in [h, x, *b.parameters()] if t is not None and t.requires_grad]
    torch.testing.assert_close(torch.autograd.grad(fused, leaves, g), torch.autograd.grad(plain, leaves, g))


def test_add_to_works_under_torch_func_and_autocast():
    """torch.func transforms and bf16 autocast take autograd's own graph of the plain ops."""
    torch.manual_seed(2)
    b = Bottleneck(8, AdapterConfig(size=2, init_std=0.5))
    h = torch.randn(2, 3, 8)
    got = torch.func.grad(lambda t: b.add_to(t).pow(2).sum())(h)
    h1 = h.clone().requires_grad_(True)
    (h1 + b(h1)).pow(2).sum().backward()
    torch.testing.assert_close(got, h1.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = b.add_to(h1)
    assert "AddBottleneck" not in type(out.grad_fn).__name__
    out.float().sum().backward()  # no dtype clash in backward


def test_second_order_gradients_raise_and_unknown_activations_take_autograd():
    """Double backward through the one-node adapter raises (it would be wrong); an activation the
    hand-written backward does not know (here Sigmoid) runs autograd's own graph of the plain ops."""
    torch.manual_seed(3)
    b = Bottleneck(8, AdapterConfig(size=2, init_std=0.5))
    h = torch.randn(2, 3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(b.add_to(h).pow(2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|doesn't require grad"):
        g.pow(2).sum().backward()
    b.act = torch.nn.Sigmoid()
    out = b.add_to(h)
    assert "AddBottleneck" not in type(out.grad_fn).__name__
    got = torch.autograd.grad(out.sum(), h)[0]
    want = torch.autograd.grad((h + b(h)).sum(), h)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("wrap", ["weight_norm", "parametrize"])
def test_add_to_uses_computed_weights_of_reparametrised_projections(wrap):
    """add_to reads plain parameters from the module dicts for speed; projections whose weight is
    computed (weight norm, torch.nn.utils.parametrize) must still work, gradients included."""
    torch.manual_seed(0)
    b = Bottleneck(16, AdapterConfig(size=4, init_std=0.1))
    for lin in (b.down, b.up):
        if wrap == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(lin)
        else:
            torch.nn.utils.parametrize.register_parametrization(lin, "weight", _Doubled())
    assert "weight" not in b.down._parameters
    h = torch.randn(2, 3, 16, requires_grad=True)
    out = b.add_to(h)
    torch.testing.assert_close(out, h + b(h))
    out.sum().backward()
    assert h.grad is not None and all(p.grad is not None for p in b.parameters())
    with torch.no_grad():
        torch.testing.assert_close(b.add_to(h), h + b(h))


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("grad", [False, True])
def test_flop_counters_see_both_projections(grad):
    """The up-projection accumulates in place; torch's FlopCounterMode must still count it (it does
    not know ``addmm_``), or FLOP-based comparisons of adapters come out low."""
    from torch.utils.flop_counter import FlopCounterMode

    b = Bottleneck(8, AdapterConfig(size=2, init_std=0.1))
    h = torch.randn(3, 5, 8, requires_grad=grad)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        b.add_to(h)
    assert counter.get_total_flops() == 2 * (2 * 15 * 8 * 2)  # down and up: 2 * rows * d * m each


@pytest.mark.skipif(native.library() is None, reason="no C compiler or no AVX2 CPU here")
@pytest.mark.parametrize("grad", [True, False])
def test_gelu_adapter_at_scale_uses_the_c_gelu_and_equals_the_plain_ops(gelu_calls, grad):
    """From lean_gelu.GELU_MIN_ENTRIES activations up, the adapter's exact GELU and its gradient run in C
    (forward, and backward's recomputation and gradient): values and gradients equal h + b(h)."""
    torch.manual_seed(2)
    b = Bottleneck(48, AdapterConfig(size=64, init_std=0.5))
    h = torch.randn(4, 80, 48, requires_grad=grad)  # 320 rows x m = 64: 20,480 activations
    with torch.set_grad_enabled(grad):
        fused = b.add_to(h)
    plain = h + b(h)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    if grad:
        g = torch.randn_like(plain)
        leaves = [h, *b.parameters()]
        torch.testing.assert_close(
            torch.autograd.grad(fused, leaves, g), torch.autograd.grad(plain, leaves, g), rtol=1e-4, atol=1e-4
        )
    assert gelu_calls == ({"forward": 2, "backward": 1} if grad else {"forward": 1, "backward": 0})
    kernels.set_native(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(b.add_to(h), plain, rtol=1e-5, atol=1e-5)
    finally:
        kernels.set_native(True)
