"""torch.ops.statemamba.* from Python: against a pure-PyTorch reference, torch.autograd.gradcheck,
torch.library.opcheck and shape inference on the meta device.

Run with STATEMAMBA_LIBRARY=<build>/libstatemamba.so (CTest sets it).
"""
import os

import pytest
import torch
import torch.nn.functional as F

if "STATEMAMBA_LIBRARY" not in os.environ:
    raise RuntimeError("set STATEMAMBA_LIBRARY to the built libstatemamba.so")
torch.ops.load_library(os.environ["STATEMAMBA_LIBRARY"])
sm = torch.ops.statemamba

# Output tolerance against the float64 reference (which reads the same rounded inputs): the float32
# state arithmetic plus one rounding of y to its dtype.
TOL = {
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2**-11 + 1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-8 + 1e-5, atol=1e-5),
}
DTYPES = list(TOL)


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- pure-PyTorch references (float64, differentiable) ----------------------------------------


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, reset=None):
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, L = u.shape
    dt = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = F.softplus(dt)  # threshold 20, as the ops
    h = initial_state.double() if initial_state is not None else u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        if reset is not None:
            h = torch.where(reset[:, t, None, None], torch.zeros_like(h), h)
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        y = (h * C[:, None, :, t]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        if z is not None:
            y = y * F.silu(z[:, :, t].double())
        ys.append(y)
    return torch.stack(ys, -1), h


def reference_conv(x, weight, bias=None, initial_state=None, reset=None, silu=False):
    """A sliding window of the last W-1 inputs; a reset empties it before the step."""
    batch, dim, L = x.shape
    width = weight.shape[1]
    window = (initial_state.double() if initial_state is not None
              else x.new_zeros(batch, dim, width - 1, dtype=torch.float64))
    ys = []
    for t in range(L):
        if reset is not None:
            window = torch.where(reset[:, t, None, None], torch.zeros_like(window), window)
        full = torch.cat([window, x[:, :, t:t + 1].double()], -1)
        y = (full * weight.double()).sum(-1)
        if bias is not None:
            y = y + bias.double()
        ys.append(F.silu(y) if silu else y)
        window = full[:, :, 1:]
    return torch.stack(ys, -1), window


# ---- inputs -----------------------------------------------------------------------------------


def scan_inputs(batch=3, dim=5, dstate=4, L=37, dtype=torch.float32, param_dtype=None, seed=0,
                optional=True, reset_p=0.2):
    """(args, kwargs) for selective_scan; drawn in float64 and rounded, so all dtypes see one case."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or state_dtype(dtype)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    args = [randn(batch, dim, L).to(dtype),
            (randn(batch, dim, L) * 0.5 - 1).to(dtype),
            (-torch.exp(rand(dim, dstate) * 2 - 1)).to(param_dtype),
            randn(batch, dstate, L).to(dtype),
            randn(batch, dstate, L).to(dtype)]
    kwargs = dict(delta_softplus=True)
    if optional:
        kwargs.update(D=randn(dim).to(param_dtype), z=randn(batch, dim, L).to(dtype),
                      delta_bias=(rand(dim) - 0.5).to(param_dtype),
                      initial_state=randn(batch, dim, dstate).to(state_dtype(dtype)),
                      reset=rand(batch, L) < reset_p)
    return args, kwargs


def conv_inputs(batch=3, dim=5, width=4, L=37, dtype=torch.float32, seed=0, optional=True, silu=True,
                reset_p=0.2):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    args = [randn(batch, dim, L).to(dtype), (randn(dim, width) * 0.5).to(state_dtype(dtype))]
    kwargs = dict(silu=silu)
    if optional:
        kwargs.update(bias=(randn(dim) * 0.3).to(state_dtype(dtype)),
                      initial_state=randn(batch, dim, width - 1).to(state_dtype(dtype)),
                      reset=torch.rand(batch, L, generator=g) < reset_p)
    return args, kwargs


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


# ---- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optional", [True, False], ids=["all", "none"])
@pytest.mark.parametrize("dstate", [1, 16])
def test_selective_scan_matches_reference(dtype, optional, dstate):
    args, kwargs = scan_inputs(dtype=dtype, dstate=dstate, optional=optional)
    y, state = sm.selective_scan(*args, **kwargs)
    y_ref, state_ref = reference_scan(*args, **kwargs)
    assert y.dtype == dtype and state.dtype == state_dtype(dtype)
    assert_close(y, y_ref, dtype)
    assert_close(state, state_ref, state.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("optional", [True, False], ids=["all", "none"])
def test_causal_conv1d_matches_reference(dtype, width, optional):
    args, kwargs = conv_inputs(dtype=dtype, width=width, optional=optional)
    y, state = sm.causal_conv1d(*args, **kwargs)
    y_ref, state_ref = reference_conv(*args, **kwargs)
    assert y.dtype == dtype and state.dtype == state_dtype(dtype)
    assert_close(y, y_ref, dtype)
    torch.testing.assert_close(state, state_ref.to(state.dtype), rtol=0, atol=0)  # stored inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_steps_equal_sequence_ops(dtype):
    """Stepping the decode ops over a sequence (resets included) equals the sequence ops."""
    args, kwargs = scan_inputs(dtype=dtype, L=13, seed=1)
    u, delta, A, B, C = args
    y_seq, state_seq = sm.selective_scan(*args, **kwargs)
    state = kwargs["initial_state"].clone()
    ys = [sm.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], kwargs["D"],
                                    kwargs["z"][..., t], kwargs["delta_bias"], True, kwargs["reset"][:, t])
          for t in range(u.shape[-1])]
    torch.testing.assert_close(torch.stack(ys, -1), y_seq, rtol=0, atol=0)
    torch.testing.assert_close(state, state_seq, rtol=0, atol=0)

    (x, weight), ckw = conv_inputs(dtype=dtype, L=13, seed=2)
    y_seq, state_seq = sm.causal_conv1d(x, weight, **ckw)
    state = ckw["initial_state"].clone()
    ys = [sm.causal_conv1d_update(x[..., t], state, weight, ckw["bias"], True, ckw["reset"][:, t])
          for t in range(x.shape[-1])]
    torch.testing.assert_close(torch.stack(ys, -1), y_seq, rtol=0, atol=0)
    torch.testing.assert_close(state, state_seq, rtol=0, atol=0)


def test_chunks_with_carried_state_equal_one_pass():
    args, kwargs = scan_inputs(seed=3)
    kwargs["reset"][0, 20] = True  # on a chunk edge
    y, state = sm.selective_scan(*args, **kwargs)
    u, delta, A, B, C = args
    ys, carried = [], kwargs["initial_state"]
    for t0, t1 in [(0, 7), (7, 20), (20, 21), (21, 37)]:
        steps = lambda t: t[..., t0:t1]
        kw = dict(kwargs, z=steps(kwargs["z"]), reset=steps(kwargs["reset"]), initial_state=carried)
        y_chunk, carried = sm.selective_scan(steps(u), steps(delta), A, steps(B), steps(C), **kw)
        ys.append(y_chunk)
    torch.testing.assert_close(torch.cat(ys, -1), y, rtol=0, atol=0)
    torch.testing.assert_close(carried, state, rtol=0, atol=0)


# ---- gradients --------------------------------------------------------------------------------


def requiring_grad(args, kwargs, names):
    args = [a.detach().clone().requires_grad_(True) for a in args]
    kwargs = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in kwargs.items()}
    return args, kwargs


@pytest.mark.parametrize("softplus", [True, False])
def test_selective_scan_gradcheck(softplus):
    args, kwargs = scan_inputs(batch=2, dim=3, dstate=4, L=6, dtype=torch.float64, seed=4, reset_p=0.3)
    kwargs["delta_softplus"] = softplus
    if not softplus:
        args[1] = args[1].abs() * 0.3  # Δ itself: a small positive step
    kwargs["reset"][1, 0] = True  # row 1's initial_state is forgotten: zero gradient
    names = ["D", "z", "delta_bias", "initial_state"]
    args, kwargs = requiring_grad(args, kwargs, names)
    inputs = (*args, *(kwargs[n] for n in names))

    def run(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return sm.selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, kwargs["reset"])

    # check_undefined_grad also runs backward with y's or final_state's gradient undefined.
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # And the same gradients as autograd through the reference.
    weights = [torch.randn_like(o) for o in run(*inputs)]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(run(*inputs), weights)), inputs)
    ref_out = reference_scan(*args, **kwargs)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref_out, weights)), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_gradcheck(width):
    args, kwargs = conv_inputs(batch=2, dim=3, width=width, L=7, dtype=torch.float64, seed=5, reset_p=0.3)
    kwargs["reset"][1, 0] = True
    names = ["bias", "initial_state"]
    args, kwargs = requiring_grad(args, kwargs, names)
    inputs = (*args, *(kwargs[n] for n in names))

    def run(x, weight, bias, initial_state):
        return sm.causal_conv1d(x, weight, bias, initial_state, kwargs["reset"], True)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    weights = [torch.randn_like(o) for o in run(*inputs)]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(run(*inputs), weights)), inputs)
    ref_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(reference_conv(*args, **kwargs), weights)), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# ---- opcheck and meta -------------------------------------------------------------------------


def small_scan(dtype=torch.float32):
    return scan_inputs(batch=2, dim=3, dstate=4, L=5, dtype=dtype, seed=6)


def small_conv(dtype=torch.float32):
    return conv_inputs(batch=2, dim=3, width=4, L=5, dtype=dtype, seed=7)


def opcheck_cases():
    s_args, s_kw = small_scan()
    c_args, c_kw = small_conv()
    s_grad = requiring_grad(*small_scan(torch.float64), ["D", "z", "delta_bias", "initial_state"])
    c_grad = requiring_grad(*small_conv(torch.float64), ["bias", "initial_state"])
    u, delta, A, B, C = s_args
    x, weight = c_args
    step = (s_kw["initial_state"].clone(), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], s_kw["D"],
            s_kw["z"][..., 0], s_kw["delta_bias"], True, s_kw["reset"][:, 0])
    conv_step = (x[..., 0], c_kw["initial_state"].clone(), weight, c_kw["bias"], True, c_kw["reset"][:, 0])
    gen = torch.Generator().manual_seed(8)
    linear_args = tuple(torch.randn(shape, generator=gen) for shape in [(3, 5), (4, 5), (4,)])
    return [
        pytest.param(sm.selective_scan.default, s_args, s_kw, id="selective_scan"),
        pytest.param(sm.selective_scan.default, *s_grad, id="selective_scan_grad"),
        pytest.param(sm.causal_conv1d.default, c_args, c_kw, id="causal_conv1d"),
        pytest.param(sm.causal_conv1d.default, *c_grad, id="causal_conv1d_grad"),
        pytest.param(sm.selective_state_update.default, step, {}, id="selective_state_update"),
        pytest.param(sm.causal_conv1d_update.default, conv_step, {}, id="causal_conv1d_update"),
        pytest.param(sm.small_batch_linear.default, linear_args, {}, id="small_batch_linear"),
        pytest.param(sm.add_rms_norm_linear.default, norm_linear_args(), {}, id="add_rms_norm_linear"),
    ]


def norm_linear_args(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(10)
    hidden, residual, norm_weight, weight, bias = (
        torch.randn(shape, generator=gen).to(dtype).to(device) for shape in [(2, 8), (2, 8), (8,), (5, 8), (5,)])
    return (hidden, residual, norm_weight, 1e-5, torch.float32, weight, bias)


@pytest.mark.parametrize("op,args,kwargs", opcheck_cases())
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op, args, kwargs)


def to_meta(value):
    return value.to("meta") if torch.is_tensor(value) else value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_meta_shapes(dtype):
    args, kwargs = scan_inputs(batch=2, dim=3, dstate=4, L=5, dtype=dtype)
    y, state = sm.selective_scan(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == dtype
    assert state.shape == (2, 3, 4) and state.dtype == state_dtype(dtype)

    args, kwargs = conv_inputs(batch=2, dim=3, width=4, L=5, dtype=dtype)
    y, state = sm.causal_conv1d(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == dtype
    assert state.shape == (2, 3, 3) and state.dtype == state_dtype(dtype)

    (u, delta, A, B, C), kw = scan_inputs(batch=2, dim=3, dstate=4, L=1, dtype=dtype)
    y = sm.selective_state_update(*map(to_meta, (kw["initial_state"], u[..., 0], delta[..., 0], A, B[..., 0],
                                                 C[..., 0], kw["D"], kw["z"][..., 0], kw["delta_bias"], True,
                                                 kw["reset"][:, 0])))
    assert y.device.type == "meta" and y.shape == (2, 3) and y.dtype == dtype

    (x, weight), kw = conv_inputs(batch=2, dim=3, width=4, L=1, dtype=dtype)
    y = sm.causal_conv1d_update(*map(to_meta, (x[..., 0], kw["initial_state"], weight, kw["bias"], True,
                                               kw["reset"][:, 0])))
    assert y.device.type == "meta" and y.shape == (2, 3) and y.dtype == dtype

    x, weight, bias = (torch.empty(shape, dtype=dtype, device="meta") for shape in [(3, 5), (4, 5), (4,)])
    y = sm.small_batch_linear(x, weight, bias)
    assert y.device.type == "meta" and y.shape == (3, 4) and y.dtype == dtype

    y, residual = sm.add_rms_norm_linear(*map(to_meta, norm_linear_args(dtype)))
    assert y.device.type == "meta" and y.shape == (2, 5) and y.dtype == dtype
    assert residual.shape == (2, 8) and residual.dtype == torch.float32


def test_small_batch_linear_is_linear():
    gen = torch.Generator().manual_seed(9)
    x, weight, bias = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(3, 7), (5, 7), (5,)])
    torch.testing.assert_close(sm.small_batch_linear(x, weight, bias), x @ weight.T + bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm.small_batch_linear(x, weight), x @ weight.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"small_batch_linear: argument 'weight' must have shape"):
        sm.small_batch_linear(x, weight[:, :6])


def test_meta_rejects_bad_shapes_with_the_cpu_message():
    args, kwargs = scan_inputs(batch=2, dim=3, dstate=4, L=5)
    args[1] = args[1][..., :4]
    with pytest.raises(RuntimeError, match=r"'delta' must have shape \[batch, d_inner, L\]"):
        sm.selective_scan(*args, **kwargs)
    with pytest.raises(RuntimeError, match=r"'delta' must have shape \[batch, d_inner, L\]"):
        sm.selective_scan(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
