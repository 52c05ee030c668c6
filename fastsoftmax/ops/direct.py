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


def _not_for_the_kernels() -> bool:
    """A tracer (torch.compile, torch.jit.trace, a dispatch mode), a functorch transform or forward-mode AD is active.

    ``is_compiling()`` first: torch.compile folds it to True while it traces and never reaches the others.
    """
    return (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    )


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
        if _not_for_the_kernels():
            return cls.through_functions(*args, **kwargs)
        return super().apply(*args, **kwargs)
