"""Applying an autograd Function without the Python half of ``Function.apply``.

``torch.autograd.Function.apply`` is a Python classmethod around the C
``torch._C._FunctionBase.apply``. Before it calls the C half it binds
default arguments (only for a Function that defines ``setup_context``),
sends calls made under functorch transforms (``torch.func.vmap``, ``grad``,
...) to ``custom_function_call`` (where our Functions, which have no
``setup_context``, raise; :mod:`fastsoftmax.functional` computes those
calls in torch's ops instead), and unwraps "dead" functorch wrappers
(tensors that escaped a finished transform). At the book's 256 x 10, with
the caches as cold as a training step leaves them, that Python costs 9-13 us
a call (``benchmarks/results/cpu-xeon-2core/NOTES.md``): as much as our
whole kernel.

:func:`direct_apply` does the same work for our Functions (none defines
``setup_context``) with two calls into C: outside functorch transforms it
unwraps dead wrappers and calls the C half; inside them it calls the public
``apply``, which raises torch's own error. Where this torch lacks any of the
three internals it relies on, it is the public ``apply`` itself.

The backward has the same kind of Python layer: the engine calls the node's
``apply`` (``BackwardCFunction.apply``), which looks up ``backward`` and
``vjp`` on the Function class and checks that only one is defined before
it calls ``backward``: two Python frames per backward. :func:`direct_apply`
also binds the node's ``apply`` to the Function's ``backward`` itself,
where the Function defines ``backward`` and not ``vjp`` (then the lookup
always finds ``backward``) and does not ask for boxed gradients.
"""

import torch


def _internals():
    try:
        return (
            torch._C._FunctionBase.__dict__["apply"],
            torch._C._are_functorch_transforms_active,
            torch._C._functorch.unwrap_if_dead,
        )
    except (AttributeError, KeyError):
        return None


_INTERNALS = _internals()


def direct_apply(cls, n_tensors: int, under_transforms=None):
    """``cls.apply``, for a Function whose first ``n_tensors`` arguments are its only tensors, minus the Python wrapper.

    ``under_transforms``: what to call instead, with the same arguments,
    while functorch transforms are active (``cls.apply`` itself if None).
    """
    if _INTERNALS is None or cls.setup_context is not torch.autograd.Function.setup_context:
        return cls.apply
    c_apply, transforms_active, unwrap = _INTERNALS
    c_apply = c_apply.__get__(None, cls)
    _direct_backward(cls)
    public = under_transforms or cls.apply
    if n_tensors == 1:

        def apply(a, *rest):
            if transforms_active():
                return public(a, *rest)
            return c_apply(unwrap(a), *rest)

    elif n_tensors == 2:

        def apply(a, b, *rest):
            if transforms_active():
                return public(a, b, *rest)
            return c_apply(unwrap(a), unwrap(b), *rest)

    else:
        raise ValueError(f"direct_apply: {n_tensors} tensor arguments are not supported")
    apply.__doc__ = f"``{cls.__name__}.apply`` without its Python wrapper (:func:`{__name__}.direct_apply`)."
    return apply


def _direct_backward(cls) -> None:
    """Have the engine call ``cls.backward(ctx, *grads)`` straight from the node (see the module's docstring)."""
    node = getattr(cls, "_backward_cls", None)
    base = getattr(torch.autograd.function, "BackwardCFunction", None)
    if (
        node is None
        or base is None
        or not issubclass(node, base)
        or node.apply is not base.apply  # already bound, or torch's own changed
        or cls.vjp is not torch.autograd.Function.vjp
        or getattr(cls, "boxed_grads_call", False)
    ):
        return
    node.apply = cls.backward  # a plain function on the node's class: called as backward(ctx, *grads)


transforms_active = _INTERNALS[1] if _INTERNALS is not None else (lambda: False)


# --- may a call run the kernels at all? -------------------------------------------------------------------
# The checks below cost 0.5-2 us each with cold caches; at the book's 256 x 10 each counts, so they are bound here
# once and read without attribute lookups.
is_compiling = torch.compiler.is_compiling
jit_tracing = torch._C._is_tracing
dispatch_modes = torch._C._len_torch_dispatch_stack
forward_ad = torch.autograd.forward_ad


def recorded() -> bool:
    """Whether a tracer records this call: torch.compile, torch.jit.trace, or a Python dispatch mode (make_fx,
    FakeTensorMode). Our kernels are invisible to them (and a fake tensor has no memory); the registered
    ``torch.ops.fastsoftmax`` ops are not. ``is_compiling()`` first: torch.compile folds it to True while it
    traces and never reaches the others."""
    return is_compiling() or jit_tracing() or dispatch_modes() > 0


def torch_ops_only() -> bool:
    """Whether torch's own ops must compute this call: under torch.func transforms (their wrapped tensors hold
    no storage for our kernels, and our Functions have no batching rules) or forward-mode AD (no jvp)."""
    return transforms_active() or forward_ad._current_level >= 0


def plain_call() -> bool:
    """Neither :func:`recorded` nor :func:`torch_ops_only`: the kernels may run on the tensors' memory."""
    return not (is_compiling() or jit_tracing() or dispatch_modes() or transforms_active() or forward_ad._current_level >= 0)


def book_call() -> bool:
    """:func:`plain_call` for the book's path, minus its check of transforms (2 us with cold caches, a tenth of the
    call): there a call that records a graph checks it anyway (:func:`direct_apply`), and a transform's wrapped tensor
    has no address to read (``data_ptr`` raises or gives 0, which ``fastsoftmax.paths.book_rows`` and
    ``book_arrays`` refuse)."""
    return not (is_compiling() or jit_tracing() or dispatch_modes() or forward_ad._current_level >= 0)


class UnderTransforms:
    """A public Function's ``apply`` that works under tracers and transforms, as torch's own ops do.

    Under ``torch.func`` transforms the tensors are wrappers that hold no
    storage for our kernels to read, and torch refuses a Function without
    ``setup_context`` there; a tracer (``torch.compile``, ``torch.jit.trace``,
    ``make_fx``, ``FakeTensorMode``) cannot see into the kernels; forward-mode
    AD needs a jvp. ``apply`` then calls the class's
    ``through_functions(*args)``: the same call by way of
    :mod:`fastsoftmax.functional`, which runs the registered
    ``torch.ops.fastsoftmax`` ops for tracers and torch's own ops under
    transforms and forward AD. Otherwise it is the Function's own ``apply``.
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        if not plain_call():
            return cls.through_functions(*args, **kwargs)
        return super().apply(*args, **kwargs)
