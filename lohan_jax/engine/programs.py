"""The jitted per-unit programs the engine runs: block forward/backward under an activation policy, the
embedding, the head with its loss, and AdamW on the GPU. Built once per shape; blocks of one shape share them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lohan_jax.engine.layout import FlatLayout
from lohan_jax.models import DecoderModel
from lohan_jax.plan import ActivationPolicy


def _nbytes(avals) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in avals))


class BlockProgram:
    """Forward and backward of one block as two jitted functions that pass residuals explicitly.

    The forward runs jax.vjp of the (possibly rematerialised) block over its weight tree and returns only the
    residuals that are not its own inputs: the weight matrices and the block input are found among the vjp's
    residuals by inspecting the jaxpr, dropped, and re-inserted in the backward from the freshly fetched weights
    and the stored checkpoint. So weights are never held between forward and backward (the vjp of the flat
    vector would keep each matrix as a slice of it: a second copy of the block's weights per kept block), and
    what the policy saves can be swapped to host memory as plain arrays.
    """

    def __init__(self, model: DecoderModel, layout: FlatLayout, policy: ActivationPolicy,
                 w_aval: jax.ShapeDtypeStruct, x_aval: jax.ShapeDtypeStruct):
        self.policy = policy

        def block_tree(params, x_BSD):
            return model.block(params, x_BSD)

        if policy.save is not None:
            block_tree = jax.checkpoint(block_tree, policy=jax.checkpoint_policies.save_only_these_names(*policy.save))

        def block(w_flat, x_BSD):
            return block_tree(layout.unflatten(w_flat), x_BSD)

        def fwd_full(params, x_BSD):
            return jax.vjp(block_tree, params, x_BSD)

        p_aval = jax.eval_shape(layout.unflatten, w_aval)
        closed = jax.make_jaxpr(fwd_full)(p_aval, x_aval)
        (_, vjp_aval) = jax.eval_shape(fwd_full, p_aval, x_aval)
        vjp_leaves, self._vjp_treedef = jax.tree.flatten(vjp_aval)
        *p_vars, x_var = closed.jaxpr.invars
        where_p = {id(v): i for i, v in enumerate(p_vars)}
        outvars = closed.jaxpr.outvars[1:]
        assert len(outvars) == len(vjp_leaves)
        # each vjp leaf: a weight leaf (its index), the block input ("x"), a reshape of another leaf ("view",
        # rebuilt from it: cuDNN attention keeps its output in head layout beside the output projection's
        # (B, S, D) input, which XLA would return as a second buffer), or a residual to keep ("r")
        kinds = [where_p.get(id(v), "x" if v is x_var else "r") for v in outvars]
        self._views = _views(closed.jaxpr, outvars, kinds)
        for i, _, _ in self._views:
            kinds[i] = "view"
        self._kinds, views = tuple(kinds), self._views
        self.residual_avals = tuple(a for a, k in zip(vjp_leaves, self._kinds) if k == "r")
        self.residual_nbytes = _nbytes(self.residual_avals)
        kinds = self._kinds

        def fwd(w_flat, x_BSD):
            y, vjp = jax.vjp(block_tree, layout.unflatten(w_flat), x_BSD)
            return y, [leaf for leaf, k in zip(jax.tree.leaves(vjp), kinds) if k == "r"]

        def bwd(w_flat, x_BSD, residuals, dy_BSD):
            it, p_leaves = iter(residuals), jax.tree.leaves(layout.unflatten(w_flat))
            leaves = [x_BSD if k == "x" else next(it) if k == "r" else None if k == "view" else p_leaves[k]
                      for k in kinds]
            for i, src, shape in views:
                leaves[i] = leaves[src].reshape(shape)
            dparams, dx = jax.tree.unflatten(self._vjp_treedef, leaves)(dy_BSD)
            dw = layout.flatten(dparams).astype(w_flat.dtype)
            return dx, dw, jnp.sum(jnp.square(dw.astype(jnp.float32)))

        if policy.chunks > 1:
            fwd, bwd = _chunked(block, policy.chunks)
            self.residual_avals, self.residual_nbytes = (), 0
        self.fwd = jax.jit(fwd)
        self.bwd = jax.jit(bwd, donate_argnums=(2, 3))
        self.apply = jax.jit(block)  # forward only (evaluation)


def _views(jaxpr, outvars, kinds) -> list[tuple[int, int, tuple[int, ...]]]:
    """(position, source position, shape) of each residual that is another vjp leaf reshaped (or merely renamed
    by checkpoint_name), sources before their views, so the backward rebuilds it instead of keeping a copy."""
    alias, made_by = {}, {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":
            alias[id(eqn.outvars[0])] = alias.get(id(eqn.invars[0]), eqn.invars[0])
        elif eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is None:  # not a transposing one
            made_by[id(eqn.outvars[0])] = eqn.invars[0]
    root = lambda v: alias.get(id(v), v)
    first = {}
    for i, v in enumerate(outvars):
        first.setdefault(id(root(v)), i)
    views = []
    for i, v in enumerate(outvars):
        if kinds[i] != "r":
            continue
        r = root(v)
        src = first[id(r)] if first[id(r)] != i else None  # the same value returned twice
        if src is None and id(r) in made_by:
            src = first.get(id(root(made_by[id(r)])))
        if src is not None and src != i:
            views.append((i, src, tuple(v.aval.shape)))
    # a source may itself be a view: order so each source is rebuilt before the views that read it
    order, done, pending = [], set(range(len(kinds))) - {i for i, _, _ in views}, list(views)
    while pending:
        ready = [t for t in pending if t[1] in done]
        if not ready:  # a cycle cannot arise from one jaxpr's reshapes; keep the rest as residuals
            break
        order += ready
        done |= {t[0] for t in ready}
        pending = [t for t in pending if t not in ready]
    return order


def _chunked(block, chunks: int):
    """Forward and backward over `chunks` slices of the batch; the weight gradient accumulates in fp32."""

    def split(a):
        if a.shape[0] % chunks:
            raise ValueError(f"activation policy chunks={chunks} must divide the micro-batch size {a.shape[0]}")
        return a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])

    def fwd(w_flat, x_BSD):
        y = jax.lax.map(lambda xc: block(w_flat, xc), split(x_BSD))
        return y.reshape(x_BSD.shape), []

    def bwd(w_flat, x_BSD, residuals, dy_BSD):
        def body(acc, chunk):
            xc, dyc = chunk
            _, vjp = jax.vjp(block, w_flat, xc)
            dw, dxc = vjp(dyc)
            return acc + dw.astype(jnp.float32), dxc

        acc, dx = jax.lax.scan(body, jnp.zeros(w_flat.shape, jnp.float32), (split(x_BSD), split(dy_BSD)))
        dw = acc.astype(w_flat.dtype)
        return dx.reshape(x_BSD.shape), dw, jnp.sum(jnp.square(dw.astype(jnp.float32)))

    return fwd, bwd


class EdgePrograms:
    """Embedding and head + loss. The head also returns the gradient of the tied embedding, if any."""

    def __init__(self, model: DecoderModel, embed: FlatLayout, head: FlatLayout, head_chunk_bytes: int = 1 << 30):
        self.tied = model.tied_weight is not None

        def embed_fwd(w_flat, tokens):
            return model.embed(embed.unflatten(w_flat), tokens)

        def embed_bwd(w_flat, tokens, dx, *g_tied):
            _, vjp = jax.vjp(lambda w: embed_fwd(w, tokens), w_flat)
            (dw,) = vjp(dx)
            if g_tied:  # the tied head's share of the embedding gradient
                dw = dw + g_tied[0]
            return dw, jnp.sum(jnp.square(dw.astype(jnp.float32)))

        def head_loss(wh_flat, we_flat, x_BSD, targets, weights):
            p_embed = embed.unflatten(we_flat) if self.tied else None
            return model.head_loss(head.unflatten(wh_flat), p_embed, x_BSD, targets, weights)

        def head_fwd_bwd(wh_flat, we_flat, x_BSD, targets, weights):
            grad_fn = jax.value_and_grad(head_loss, argnums=(0, 1, 2))
            B, S, _ = x_BSD.shape
            rows = _head_chunk_rows(B, S, model.spec.vocab_size if model.spec else 0, head_chunk_bytes)
            if rows == B:
                loss, (dwh, dwe, dx) = grad_fn(wh_flat, we_flat, x_BSD, targets, weights)
            else:  # fp32 logits of the whole batch would not fit: loss and gradients chunk by chunk
                split = lambda a: a.reshape(B // rows, rows, *a.shape[1:])

                def body(carry, chunk):
                    loss, dwh, dwe = carry
                    l, (gh, ge, dxc) = grad_fn(wh_flat, we_flat, *chunk)
                    return (loss + l, dwh + gh.astype(jnp.float32), dwe + ge.astype(jnp.float32)), dxc

                zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
                (loss, dwh, dwe), dx = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros(wh_flat), zeros(we_flat)),
                                                    (split(x_BSD), split(targets), split(weights)))
                dx, dwh, dwe = dx.reshape(x_BSD.shape), dwh.astype(wh_flat.dtype), dwe.astype(we_flat.dtype)
            return loss, dx, dwh, dwe, jnp.sum(jnp.square(dwh.astype(jnp.float32)))

        self.embed_fwd = jax.jit(embed_fwd)
        self.embed_bwd = jax.jit(embed_bwd, donate_argnums=(2,))
        self.head_fwd_bwd = jax.jit(head_fwd_bwd, donate_argnums=(2,))
        self.head_loss = jax.jit(head_loss)
        self.add = jax.jit(jnp.add)


def _head_chunk_rows(batch: int, seq: int, vocab: int, max_bytes: int) -> int:
    """Largest divisor of the batch whose fp32 logits (and their gradient) stay under max_bytes."""
    if not vocab:
        return batch
    rows = batch
    while rows > 1 and rows * seq * vocab * 4 > max_bytes:
        rows -= 1
        while batch % rows:
            rows -= 1
    return rows


def _adamw_gpu(master, mu, nu, grad, lr, count, grad_scale, leaf_decay, *, layout, b1, b2, eps, compute_dtype):
    """optax.adamw's arithmetic, in its order, on flat fp32 vectors (count is 1-based)."""
    g = grad.astype(jnp.float32) * grad_scale
    mu = (1 - b1) * g + b1 * mu
    nu = (1 - b2) * (g * g) + b2 * nu
    mu_hat = mu / (1 - b1 ** count).astype(jnp.float32)
    nu_hat = nu / (1 - b2 ** count).astype(jnp.float32)
    update = mu_hat / (jnp.sqrt(nu_hat) + eps) + layout.decay_vector(leaf_decay) * master
    master = master + (-lr) * update
    return master, mu, nu, master.astype(compute_dtype)


def make_gpu_adamw(layout: FlatLayout, b1: float, b2: float, eps: float, weight_decay: float, compute_dtype: Any):
    """AdamW for units whose state lives in HBM; master and moments are donated (updated in place). The
    per-element decay mask is expanded inside the program from per-leaf values, so it costs no memory."""
    fn = jax.jit(lambda master, mu, nu, grad, lr, count, scale, leaf_decay: _adamw_gpu(
        master, mu, nu, grad, lr, count, scale, leaf_decay, layout=layout, b1=b1, b2=b2, eps=eps,
        compute_dtype=compute_dtype), donate_argnums=(0, 1, 2))
    leaf_decay = jnp.asarray(layout.leaf_decay(weight_decay))
    return lambda master, mu, nu, grad, lr, count, scale: fn(master, mu, nu, grad, lr, count, scale, leaf_decay)


make_accumulate = lambda: jax.jit(lambda acc, g: acc + g.astype(jnp.float32), donate_argnums=(0,))
