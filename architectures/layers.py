"""Shared Transformer building blocks: RMSNorm, rotary embeddings, SwiGLU, attention, init helpers.

Shapes: ``B`` batch, ``T``/``S`` sequence, ``D`` width, ``H`` heads, ``Dh = D // H`` head width.
Attention masks are boolean with ``True`` = "may attend", or the equivalent additive float bias (``0`` /
``-inf``, from :func:`attention_bias`), broadcastable to ``[B, H, Tq, Tk]``. Models convert their mask to a
bias once per forward: the bias then rides along in the score GEMM (``baddbmm``) instead of a separate
``masked_fill`` over every layer's ``[B, H, Tq, Tk]`` scores.

Second-order gradients: PyTorch's fused ``scaled_dot_product_attention`` kernels have no double backward
(some drop second-order terms silently). :func:`attention` therefore runs plain matmul + float32 softmax
whenever a graph may later be differentiated twice, i.e. grad mode is on and an input requires grad, and the
fused kernel only when no graph is being built at all.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionBackend = Literal["auto", "math", "fused"]
InitScheme = Literal["xavier", "xavier_normal", "normal"]
INIT_SCHEMES = ("xavier", "xavier_normal", "normal")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in float32 for low-precision inputs.

    The normalization is one autograd node (:class:`_Normalize`) whose backward is itself one node with a
    hand-derived backward, so the create_graph backward that EBT training runs through every norm costs a
    few fused passes instead of autograd's generic graph of ``pow``/``mean``/``rsqrt``/``mul`` nodes.
    Exact to every order (second and third derivatives are tested against the composite formula).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        compute = x if x.dtype == torch.float64 else x.float()
        return _apply(_Normalize, compute, self.eps)[0].to(x.dtype) * self.weight


def _inverse_rms(x: Tensor, eps: float) -> Tensor:
    """``r = (mean(x^2) + eps)^(-1/2)`` over the last dimension, ``[..., 1]`` (one pass over ``x``)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.rsqrt(norm * norm / x.shape[-1] + eps)


def _functorch_active() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jacrev, ...): the nodes below then skip their in-place
    and ``out=`` shortcuts, which a batched tensor cannot be written into, for the plain out-of-place ops."""
    return torch._C._are_functorch_transforms_active()


def _refuse_nested_forward_mode() -> None:
    """The nodes' ``jvp`` rules are one forward level deep: under two (``jacfwd`` of ``jacfwd``, ``jvp`` of
    ``jvp``) their second-order terms would be missing, so that is refused rather than answered wrongly."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        levels = sum(type(level).__name__ == "JvpInterpreter" for level in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # a torch without this introspection: no check
        return
    if levels > 1:
        raise NotImplementedError(
            "nested forward-mode derivatives (jacfwd of jacfwd, jvp of jvp) are not implemented for the "
            "architectures' hand-derived nodes; take the outer derivative in reverse mode, e.g. "
            "torch.func.jacrev(torch.func.hessian(f)) or torch.func.jacrev(torch.func.jacrev(torch.func.grad(f)))")


def _apply(node: type, *args):
    """``node.apply(*args)``, eagerly through the node's forward-mode twin (the same class plus its ``tangents`` as
    the ``jvp`` rule). ``torch.compile``'s tracer falls back to eager on an ``autograd.Function`` with a ``jvp`` rule
    (compiled thinking measured 0.6-0.8x eager with one), so compiled code calls the node without it."""
    return (node if torch.compiler.is_compiling() else _FORWARD_MODE[node]).apply(*args)


class _Normalize(torch.autograd.Function):
    """``(n, r)``: ``n = x * r`` with ``r = (mean(x^2) + eps)^(-1/2)`` over the last dimension.

    ``r`` is returned for this module's own backward only (the backward ignores a gradient of it; its ``jvp``
    gives its exact tangent). The hand-derived nodes in this module are written in ``setup_context`` form with
    generated vmap rules and ``jvp`` rules, so ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``,
    ``jacfwd``, ``hessian``) compose with every model built on them; intermediates the backward needs come out as
    extra outputs rather than being kept on ``ctx``. Nested forward mode (``jacfwd`` of ``jacfwd``) is refused.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        r = _inverse_rms(x, eps)
        return x * r, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, eps = inputs
        n, r = output
        ctx.save_for_backward(x, n, r)
        ctx.save_for_forward(x, n, r)
        ctx.eps = eps

    @staticmethod
    def tangents(ctx, x_tangent: Tensor, _eps_tangent: None):
        _refuse_nested_forward_mode()
        # The normalization's Jacobian is symmetric: its tangent map is its adjoint, the backward's formula;
        # dr = -r^3 mean(x dx). (n and r rebuilt from x, so a forward derivative of this one sees them move.)
        x, _, _ = ctx.saved_tensors
        r = _inverse_rms(x, ctx.eps)
        n = x * r
        projection = (x_tangent * n).mean(-1, keepdim=True)
        return r * (x_tangent - n * projection), -(r * r) * projection

    @staticmethod
    def backward(ctx, grad_n: Tensor, _grad_r: Optional[Tensor]):
        x, n, r = ctx.saved_tensors
        # One node that create_graph records, differentiable w.r.t. grad_n and x (through n and r).
        return _apply(_NormalizeBackward, grad_n, x, n, r, ctx.eps)[0], None


class _NormalizeBackward(torch.autograd.Function):
    """``grad_x = r * (g - n * a)`` with ``a = mean(g * n)`` (the adjoint of the normalization at ``x``).

    Its backward, for an upstream ``G`` and ``b = mean(G * n)``, ``c = mean(G * g)``:
    ``d/dg = r * (G - n * b)`` (the map is linear and self-adjoint in ``g``) and
    ``d/dx = r^2 * (n * (3 a b - c) - g * b - G * a)``, which accounts for ``n`` and ``r`` depending on ``x``
    (``n`` and ``r`` come in as precomputed values and receive no gradient of their own). When that backward
    itself builds a graph (a third derivative), ``n``, ``r`` and ``a`` are recomputed from ``x`` with autograd
    recording, so every order stays exact; otherwise the saved values are used.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_n: Tensor, x: Tensor, n: Tensor, r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        a = (grad_n * n).mean(-1, keepdim=True)
        return r * torch.addcmul(grad_n, n, a, value=-1.0), a  # a: for the backward (its gradient ignored)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        grad_n, x, n, r, eps = inputs
        _, a = output
        ctx.save_for_backward(grad_n, x, n, r, a)
        ctx.save_for_forward(grad_n, x, n, r, a)
        ctx.eps = eps

    @staticmethod
    def tangents(ctx, grad_tangent: Optional[Tensor], x_tangent: Optional[Tensor], _n_tangent, _r_tangent, _eps):
        _refuse_nested_forward_mode()
        # grad_x is linear and self-adjoint in grad_n, and its x-Jacobian is the Hessian of <n(x), grad_n>
        # (symmetric), so both tangents are the backward's formulas; n and r follow x (their own tangents unused).
        grad_n, x, _, _, _ = ctx.saved_tensors
        r = _inverse_rms(x, ctx.eps)  # rebuilt from x (and a from grad_n), as in the backward's graph branch
        n = x * r
        a = (grad_n * n).mean(-1, keepdim=True)
        tangent = a_tangent = None
        if grad_tangent is not None:
            tangent = r * (grad_tangent - n * (grad_tangent * n).mean(-1, keepdim=True))
            a_tangent = (grad_tangent * n).mean(-1, keepdim=True)
        if x_tangent is not None:
            b, c = (x_tangent * n).mean(-1, keepdim=True), (x_tangent * grad_n).mean(-1, keepdim=True)
            term = (n * (3.0 * a * b - c) - grad_n * b - x_tangent * a) * (r * r)
            tangent = term if tangent is None else tangent + term
            # da = mean(g dn), dn = r (dx - n b): so r (c - a b)
            a_term = r * (c - a * b)
            a_tangent = a_term if a_tangent is None else a_tangent + a_term
        return tangent, a_tangent

    @staticmethod
    def backward(ctx, upstream: Tensor, _grad_a: Optional[Tensor]):
        grad_n, x, n, r, a = ctx.saved_tensors
        if torch.is_grad_enabled() or _functorch_active():  # create_graph: rebuild n, r, a from x inside the graph
            r = _inverse_rms(x, ctx.eps)
            n = x * r
            a = (grad_n * n).mean(-1, keepdim=True)
        b = (upstream * n).mean(-1, keepdim=True)
        d_grad = r * torch.addcmul(upstream, n, b, value=-1.0) if ctx.needs_input_grad[0] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            c = (upstream * grad_n).mean(-1, keepdim=True)
            d_x = torch.addcmul(n * (3.0 * a * b - c), grad_n, b, value=-1.0)
            d_x = torch.addcmul(d_x, upstream, a, value=-1.0) * (r * r)
        return d_grad, d_x, None, None, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-split layout) at explicit integer positions.

    Positions are given per call, so a caller can place tokens anywhere (the EBT puts prediction ``i`` at
    ``i + 1``); angles are computed on the fly, so there is no table to outgrow.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head width, got {head_dim}; change dim or num_heads")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x [B, H, T, Dh]`` by ``positions [T]`` (or ``[B, T]``)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = positions.to(dtype).unsqueeze(-1) * self.inv_freq.to(dtype)  # [(B,) T, Dh/2]
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)  # [B, 1, T, Dh/2] broadcasts over heads
        return _apply(_Rotate, x.to(dtype), angles.cos(), angles.sin()).to(x.dtype)


class _Rotate(torch.autograd.Function):
    """``x [..., Dh]`` with its halves rotated pairwise: ``(a cos - b sin, a sin + b cos)`` for ``x = (a, b)``.

    A rotation is linear and its adjoint is the rotation by the opposite angle, so the backward is this same
    function with ``-sin``: one node per derivative order (a create_graph backward records one node, not autograd's
    graph of four products, two sums and a concatenation), differentiable to any order. Bit-equal to that graph:
    the same products, and each gradient the same two-term sum. Eagerly, the products are written straight into
    the two halves of the output (the same operations in the same order, so the same bits): no concatenation pass
    and one scratch tensor instead of four; under ``torch.compile`` (whose tracer does not take ``out=`` into
    views) the plain expression, which it fuses anyway.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=-1)
        if torch.compiler.is_compiling() or _functorch_active():
            return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
        shape = (*torch.broadcast_shapes(first.shape, cos.shape, sin.shape)[:-1], x.shape[-1])
        out = torch.empty(shape, dtype=x.dtype, device=x.device)  # contiguous, like the concatenation
        low, high = out.chunk(2, dim=-1)
        scratch = torch.mul(second, sin)
        torch.mul(first, cos, out=low).sub_(scratch)  # a cos - b sin
        torch.mul(second, cos, out=scratch)
        torch.mul(first, sin, out=high).add_(scratch)  # a sin + b cos
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)

    @staticmethod
    def tangents(ctx, x_tangent: Tensor, _cos_tangent, _sin_tangent):  # linear in x; the angles are constants
        _refuse_nested_forward_mode()
        cos, sin = ctx.saved_tensors
        return _apply(_Rotate, x_tangent, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _apply(_Rotate, grad, cos, -sin), None, None


class SwiGLU(nn.Module):
    """Bias-free gated feed-forward: ``W2 (silu(W1 x) * W3 x)``; the gate ``silu(a) * u`` is one autograd node
    (:class:`_GatedSiLU`) with hand-derived derivatives of every order."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        return self.down(_apply(_GatedSiLU, self.gate(x), self.up(x))[0])


class _GatedSiLU(torch.autograd.Function):
    """``h = silu(a) * u``. Its first-order backward is PyTorch's own (``g * u`` through the fused ``silu_backward``,
    and ``g * silu(a)``), bit for bit; under create_graph it records one node (:class:`_GatedSiLUBackward`)
    instead of autograd's product node and the composite of five elementwise ops that PyTorch differentiates
    ``silu`` through whenever a graph is built -- each of which the second-order backward then runs again.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        s = F.silu(a)
        return s * u, s  # s: for the backward (its gradient ignored)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, u = inputs
        _, s = output
        ctx.set_materialize_grads(False)  # no zero-filled gradient for s (only this module's backward reads it)
        ctx.save_for_backward(a, u, s)
        ctx.save_for_forward(a, u, s)

    @staticmethod
    def tangents(ctx, a_tangent: Optional[Tensor], u_tangent: Optional[Tensor]):
        _refuse_nested_forward_mode()
        a, u, _ = ctx.saved_tensors
        s = F.silu(a)  # rebuilt from a, so that a forward derivative of this one sees it move
        zero = a.new_zeros(())
        a_tangent = zero if a_tangent is None else a_tangent
        u_tangent = zero if u_tangent is None else u_tangent
        s_tangent = _silu_derivatives(a)[0] * a_tangent
        return s_tangent * u + s * u_tangent, s_tangent

    @staticmethod
    def backward(ctx, grad: Optional[Tensor], _grad_s: Optional[Tensor]):
        a, u, s = ctx.saved_tensors
        if grad is None:
            return None, None
        return _apply(_GatedSiLUBackward, grad, a, u, s)


def _silu_derivatives(a: Tensor) -> tuple[Tensor, Tensor]:
    """``silu'(a) = sig (1 + a (1 - sig))`` and ``silu''(a) = sig (1 - sig) (2 + a (1 - 2 sig))``, ``sig = sigmoid(a)``."""
    sig = torch.sigmoid(a)
    first = sig * (1 + a * (1 - sig))
    second = sig * (1 - sig) * (2 + a * (1 - 2 * sig))
    return first, second


class _GatedSiLUBackward(torch.autograd.Function):
    """``(grad_a, grad_u) = (silu'(a) g u, g s)`` with ``s = silu(a)``: the adjoint of ``h = silu(a) * u``.

    Its backward, for upstreams ``A`` (of ``grad_a``) and ``U`` (of ``grad_u``): ``d/dg = silu'(a) A u + U s``,
    ``d/da = silu''(a) A g u + silu'(a) U g``, ``d/du = silu'(a) A g`` (``s`` comes in as a precomputed value
    and receives no gradient of its own; ``a`` carries its dependence). Without a graph the ``silu'`` products
    run through the fused ``silu_backward``; when that backward itself builds a graph (a third derivative) every
    term is written in differentiable elementwise ops, so all orders stay exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, a: Tensor, u: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.aten.silu_backward(grad * u, a), grad * s

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def tangents(ctx, grad_tangent: Optional[Tensor], a_tangent: Optional[Tensor], u_tangent: Optional[Tensor],
            _s_tangent):  # s follows a: its own tangent unused
        _refuse_nested_forward_mode()
        grad, a, u, _ = ctx.saved_tensors
        first, second = _silu_derivatives(a)
        s = a * torch.sigmoid(a)  # rebuilt from a (see _GatedSiLU.tangents)
        zero = grad.new_zeros(())
        grad_tangent = zero if grad_tangent is None else grad_tangent
        a_tangent = zero if a_tangent is None else a_tangent
        u_tangent = zero if u_tangent is None else u_tangent
        a_out = second * a_tangent * grad * u + first * (grad_tangent * u + grad * u_tangent)
        u_out = grad_tangent * s + grad * first * a_tangent
        return a_out, u_out

    @staticmethod
    def backward(ctx, up_a: Tensor, up_u: Tensor):  # both materialized (zeros for an unused output)
        grad, a, u, s = ctx.saved_tensors
        need_grad, need_a, need_u = ctx.needs_input_grad[:3]
        d_grad = d_a = d_u = None
        if torch.is_grad_enabled() or _functorch_active():  # differentiable, out-of-place ops; s rebuilt from a
            first, second = _silu_derivatives(a)
            s = a * torch.sigmoid(a)
            if need_grad:
                d_grad = first * up_a * u + up_u * s
            if need_a:
                d_a = second * up_a * grad * u + first * up_u * grad
            if need_u:
                d_u = first * up_a * grad
            return d_grad, d_a, d_u, None
        silu_backward = torch.ops.aten.silu_backward  # silu'(a) times its first argument, one fused pass
        a_grad = up_a * grad
        if need_grad:
            d_grad = silu_backward(up_a * u, a).addcmul_(up_u, s)
        if need_u:
            d_u = silu_backward(a_grad, a)
        if need_a:
            sig = torch.sigmoid(a)  # silu''(a) as in _silu_derivatives, in place: one scratch tensor
            second = torch.rsub(sig, 1, alpha=2).mul_(a).add_(2).mul_(torch.addcmul(sig, sig, sig, value=-1))
            d_a = second.mul_(a_grad).mul_(u).add_(silu_backward(up_u * grad, a))
        return d_grad, d_a, d_u, None


def needs_math_path(*tensors: Tensor) -> bool:
    """True when a graph is being built (a later ``create_graph=True`` backward is then possible)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def select_backend(backend: AttentionBackend, *tensors: Tensor) -> Literal["math", "fused"]:
    """Resolve ``"auto"`` to ``"math"`` or ``"fused"`` for the given attention inputs."""
    if backend not in ("auto", "math", "fused"):
        raise ValueError(f"attention backend must be 'auto', 'math' or 'fused', got {backend!r}")
    if backend == "auto":
        return "math" if needs_math_path(*tensors) else "fused"
    return backend


def attention_bias(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask (True = attend) -> additive bias of ``dtype``: ``0`` where allowed, ``-inf`` elsewhere."""
    if mask.dtype != torch.bool:
        raise ValueError(f"attention_bias needs a boolean mask (True = attend), got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, backend: AttentionBackend = "auto"
) -> Tensor:
    """Scaled dot-product attention ``q [B,H,Tq,Dh], k/v [B,H,Tk,Dh] -> [B,H,Tq,Dh]``.

    ``mask`` is boolean (True = attend) or an additive float bias. ``backend="auto"`` picks the
    double-differentiable math path when a graph is being built and the fused kernel otherwise;
    ``"math"``/``"fused"`` force one.
    """
    if select_backend(backend, q, k, v) == "fused":
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # the fused kernel wants a float bias in the query's dtype
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = _scores(q, k, _as_bias(mask, q))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention_with_self(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_self: Tensor, v_self: Tensor, ctx_mask: Tensor, *,
    q_self: Optional[Tensor] = None, causal_offset: Optional[int] = None, query_block: int = 128,
) -> Tensor:
    """Each query attends to a shared context (under ``ctx_mask``) and to its own key only.

    ``q, k_self, v_self [B,H,S,Dh]``, ``k_ctx, v_ctx [B,H,L,Dh]``, ``ctx_mask [S, L]`` (boolean or additive
    bias). One softmax over the ``L`` context scores plus the diagonal self-score: ``O(S*L)`` work instead of a
    ``2S x 2S`` attention. Always the math path: callers differentiate it (w.r.t. the candidate, often twice).
    ``q_self`` (default ``q``) is the query of the self-score ``q_self . k_self``: RoPE rotates a query and
    its own key by the same angle, which cancels in their dot product, so both may be passed unrotated.

    ``causal_offset``: the caller's promise that ``ctx_mask`` is causal, query ``i`` seeing context keys
    ``< causal_offset + i + 1`` and no later ones (``causal_mask(S, L)``: ``causal_offset = L - S``). The
    queries then go in blocks of ``query_block``, each against only the keys its last query can see, so the
    masked upper triangle -- half the score and value products at ``S = L`` -- is mostly never computed
    (three quarters of the work remain at two blocks, 56% at eight). The keys a block skips have weight
    exactly zero, so this is the same attention to float rounding (the sums run over fewer zeros).
    """
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")
    q_self = q if q_self is None else q_self
    num_queries = q.shape[2]
    if causal_offset is None or num_queries <= query_block:
        return _attend_with_self(q, k_ctx, v_ctx, k_self, v_self, ctx_mask, q_self)
    # split, not slicing: a split's backward is one concatenation of the blocks' gradients, where every slice's
    # would zero-fill a full-size gradient and add it to the others (~3% of the EBT training step at S = 256).
    queries, self_keys, self_values = (t.split(query_block, dim=2) for t in (q, k_self, v_self))
    self_queries = queries if q_self is q else q_self.split(query_block, dim=2)
    total_keys, blocks = k_ctx.shape[2], []
    for index, start in enumerate(range(0, num_queries, query_block)):
        stop = min(start + query_block, num_queries)
        keys = min(causal_offset + stop, total_keys)  # every key a query of this block may see
        block_k, block_v = (k_ctx, v_ctx) if keys == total_keys else (k_ctx[:, :, :keys], v_ctx[:, :, :keys])
        blocks.append(_attend_with_self(queries[index], block_k, block_v, self_keys[index], self_values[index],
                                        ctx_mask[start:stop, :keys], self_queries[index]))
    return torch.cat(blocks, dim=2)


def _attend_with_self(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_self: Tensor, v_self: Tensor, ctx_mask: Tensor,
                      q_self: Tensor) -> Tensor:
    ctx_scores = _scores(q, k_ctx, _as_bias(ctx_mask, q))  # [B,H,S,L]
    self_scores = _scores_diagonal(q_self, k_self)  # [B,H,S,1]
    # The softmax over [context, self] written out, so the [B,H,S,L] scores are never concatenated with the
    # self column nor sliced apart again. The shift is any per-row constant: detaching it is exact (the
    # output does not depend on it) and including the finite self-score keeps fully masked rows finite.
    shift = torch.maximum(ctx_scores.amax(-1, keepdim=True), self_scores).detach()
    ctx_weights, self_weights = _apply(_ShiftedExp, ctx_scores, shift), torch.exp(self_scores - shift)
    # Normalise the [B,H,S,Dh] output rather than the [B,H,S,L] weights, and by a reciprocal of the
    # [B,H,S,1] totals: a multiply's backward is one pass where a division's is three.
    inverse_total = torch.reciprocal(ctx_weights.sum(-1, keepdim=True) + self_weights)
    mixed = ctx_weights.to(v_ctx.dtype) @ v_ctx + self_weights.to(v_self.dtype) * v_self
    return mixed * inverse_total.to(mixed.dtype)


_LOG2_E = 1.0 / math.log(2.0)


class _ShiftedExp(torch.autograd.Function):
    """``exp(x - shift)`` for a constant (detached) ``shift``, differentiable to any order.

    Computed as ``exp2((x - shift) * log2(e))``: on CPU ``torch.exp`` takes a slow path (~7x) on the ``-inf``
    entries every causal mask puts in the scores, ``torch.exp2`` does not. The derivative is the output
    itself (``grad * y``, saved as an output, so a create_graph backward differentiates it again).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, shift: Tensor) -> Tensor:
        if _functorch_active():
            return torch.exp2((x - shift) * _LOG2_E)
        return torch.sub(x, shift).mul_(_LOG2_E).exp2_()  # one new tensor, updated in place

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def tangents(ctx, x_tangent: Tensor, shift_tangent: Optional[Tensor]):
        _refuse_nested_forward_mode()
        (y,) = ctx.saved_tensors
        return y * (x_tangent if shift_tangent is None else x_tangent - shift_tangent)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        return grad * y, None


def softmax_dtype(q: Tensor) -> torch.dtype:
    """The dtype of attention logits and biases for inputs like ``q``."""
    # float32 (or float64) logits: the softmax is the numerically fragile part under low precision.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _as_bias(mask: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    dtype = softmax_dtype(q)
    return attention_bias(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)


def _scores(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``bias + q k^T / sqrt(Dh)`` in the softmax dtype, ``[B,H,Tq,Tk]``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    fusable = (q.dtype == softmax_dtype(q) and q.shape[:-2] == k.shape[:-2]
               and (bias is None or bias.dim() <= 2))
    if not fusable:  # low-precision inputs or a per-batch bias: matmul, upcast, then scale and mask
        scores = (q @ k.transpose(-2, -1)).to(softmax_dtype(q)) * scale
        return scores if bias is None else scores + bias
    # One GEMM does the scaling and the masking; no extra pass over the [B,H,Tq,Tk] scores.
    q3, k3 = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]).transpose(1, 2)
    scores = torch.bmm(q3 * scale, k3) if bias is None else torch.baddbmm(bias, q3, k3, alpha=scale)
    return scores.view(*q.shape[:-1], k.shape[-2])


def _scores_diagonal(q: Tensor, k: Tensor) -> Tensor:
    return (q * k).sum(-1, keepdim=True).to(softmax_dtype(q)) * (1.0 / math.sqrt(q.shape[-1]))


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> Tensor:
    """``[Tq, Tk]`` mask for the last ``Tq`` of ``Tk`` positions: query ``i`` sees keys ``<= Tk - Tq + i``."""
    offset = num_keys - num_queries
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    return cols <= rows + offset


class SelfAttention(nn.Module):
    """Bias-free multi-head self-attention with RoPE and an optional key/value prefix (KV cache)."""

    def __init__(self, dim: int, num_heads: int, rope_theta: float = 10000.0,
                 backend: AttentionBackend = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(dim // num_heads, rope_theta)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,T,D]`` -> ``q, k, v``, each ``[B,H,T,Dh]``, before any rotation."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,T,D]`` -> rotated ``q, k`` and ``v``, each ``[B,H,T,Dh]``."""
        q, k, v = self.split_heads(x)
        return self.rope(q, positions), self.rope(k, positions), v

    def merge(self, heads: Tensor) -> Tensor:
        """``[B,H,T,Dh] -> [B,T,D]`` through the output projection."""
        batch, _, length, _ = heads.shape
        return self.out(heads.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: Tensor, positions: Tensor, mask: Optional[Tensor],
                past: Optional[tuple[Tensor, Tensor]] = None,
                backend: Optional[AttentionBackend] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend ``x [B,T,D]`` over ``past`` keys/values followed by its own; returns output and all K/V.
        ``backend`` overrides the module's for this call (the EBT's context stream, first order only)."""
        q, k, v = self.project(x, positions)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        return self.merge(attention(q, k, v, mask, backend=backend or self.backend)), (k, v)


def modulate(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift``; ``None`` leaves ``x`` untouched."""
    if shift is None or scale is None:
        return x
    return x * (1 + scale) + shift


class TransformerBlock(nn.Module):
    """Pre-norm Llama-style block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual.

    ``modulation`` (optional) is ``(shift_attn, scale_attn, shift_ffn, scale_ffn)``, each broadcastable to
    ``[B, T, D]``; it conditions the normalized inputs of both sublayers (adaLN).
    """

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, *, norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, backend: AttentionBackend = "auto") -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = SelfAttention(dim, num_heads, rope_theta, backend)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, ffn_hidden)

    def forward(self, x: Tensor, positions: Tensor, mask: Optional[Tensor],
                past: Optional[tuple[Tensor, Tensor]] = None,
                modulation: Optional[tuple[Tensor, ...]] = None,
                backend: Optional[AttentionBackend] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        shift_a, scale_a, shift_f, scale_f = modulation if modulation is not None else (None,) * 4
        attended, kv = self.attn(modulate(self.attn_norm(x), shift_a, scale_a), positions, mask, past, backend)
        x = x + attended
        return x + self.ffn(modulate(self.ffn_norm(x), shift_f, scale_f)), kv


def init_linear(module: nn.Module, scheme: InitScheme = "xavier", std: float = 0.02,
                embedding_std: Optional[float] = None) -> None:
    """Initialise every ``nn.Linear`` below ``module``: xavier-uniform, xavier-normal (the EBT reference's
    ``nn.init.xavier_normal_``; the same variance as xavier-uniform) or N(0, std); biases to zero.
    Embeddings get N(0, ``embedding_std``) (default ``std``; the reference keeps PyTorch's N(0, 1))."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    embedding_std = std if embedding_std is None else embedding_std
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            if scheme == "xavier":
                nn.init.xavier_uniform_(sub.weight)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(sub.weight)
            else:
                nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=embedding_std)


def zero_init(linear: nn.Linear) -> None:
    """Zero weight and bias: the adaLN-Zero / zero-final-layer initialisation."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


# Each hand-derived node's forward-mode twin: the node with its ``tangents`` as the ``jvp`` rule (see ``_apply``).
_FORWARD_MODE = {node: type(f"{node.__name__}WithJvp", (node,), {"jvp": staticmethod(node.tangents)})
                 for node in (_Normalize, _NormalizeBackward, _Rotate, _GatedSiLU, _GatedSiLUBackward, _ShiftedExp)}
