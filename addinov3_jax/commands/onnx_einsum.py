"""A jax2onnx plugin: two-operand `jnp.einsum` with one contracted label as ONNX MatMul.

jax2onnx lowers every `jnp.einsum` to an ONNX `Einsum` node; onnxruntime's CPU Einsum is a
generic kernel, 20x slower than MatMul on our dense layers (`...i,io->...o` alone took 97% of a
ViT-S forward). Every einsum of the backbone and head has one contracted label, so it is one
(broadcast, batched) MatMul between transposed operands:

  lhs -> [lead..., m, k], rhs -> [lead..., k, n], out = lhs @ rhs -> [lead..., m, n]

where k is the contracted label, m / n the last label only the lhs / rhs has (a size-1 axis when
there is none), and `lead` every other output label, in output order (an operand that lacks a
lead label gets a size-1 axis, or nothing when all the labels it lacks come first: MatMul
broadcasts from the right). The result is transposed to the output order. Anything else (three
operands, several contracted labels, a label repeated in one operand, unequal sizes that einsum
would broadcast) keeps jax2onnx's own Einsum lowering.

`install()` registers the plugin over jax2onnx's; it only changes how an einsum is written to
ONNX, never what JAX computes.
"""

from __future__ import annotations

from typing import Any

_installed = False


def install() -> None:
    """Registers the MatMul lowering for `jnp.einsum` (idempotent)."""
    global _installed
    if _installed:
        return
    from jax2onnx.plugins import plugin_system
    from jax2onnx.plugins.jax.numpy import einsum as j2o_einsum

    plugin_system.import_all_plugins()  # theirs first, so that ours replaces it for good
    base = j2o_einsum.JnpEinsumPlugin
    metadata = dict(plugin_system.PLUGIN_REGISTRY[base._PRIM.name].metadata)

    class MatMulEinsum(base):
        def lower(self, ctx, eqn) -> None:
            if not _lower_as_matmul(ctx, eqn):
                super().lower(ctx, eqn)

    plugin_system.register_primitive(**metadata)(MatMulEinsum)
    _installed = True


def matmul_plan(equation: str, shapes: list[tuple]) -> dict[str, Any] | None:
    """How `equation` on operands of `shapes` runs as one MatMul, or None when it does not.

    Returns the labels of each operand (ellipsis expanded), the target label lists of both
    operands (None = an inserted size-1 axis), the MatMul's output labels and the output labels.
    """
    equation = "".join(equation.split())
    if "->" not in equation:
        return None
    ins, out = equation.split("->")
    specs = ins.split(",")
    if len(specs) != 2:
        return None
    ranks = [len(shape) - len(s.replace("...", "")) if "..." in s else 0
             for s, shape in zip(specs, shapes, strict=True)]
    if min(ranks) < 0:
        return None
    width = max(ranks)

    def expand(spec: str, n: int) -> list[str]:
        head, _, tail = spec.partition("...")
        dots = [f"...{i}" for i in range(width - n, width)] if "..." in spec else []
        return [*head, *dots, *tail]

    lhs, rhs = (expand(s, r) for s, r in zip(specs, ranks, strict=True))
    res = expand(out, width)
    if any(len(set(x)) != len(x) for x in (lhs, rhs, res)) or len(lhs) != len(shapes[0]) \
            or len(rhs) != len(shapes[1]):
        return None
    size = {}
    for labels, shape in ((lhs, shapes[0]), (rhs, shapes[1])):
        for a, d in zip(labels, shape, strict=True):
            if a in size and size[a] is not d and size[a] != d:
                return None  # einsum would broadcast a size-1 axis: keep Einsum
            size[a] = d
    contracted = [a for a in lhs if a in rhs and a not in res]
    only = [a for a in (*lhs, *rhs) if (a in lhs) != (a in rhs)]
    if len(contracted) != 1 or any(a not in res for a in only) or any(
            a not in lhs and a not in rhs for a in res):
        return None
    k = contracted[0]
    m = next((a for a in reversed(lhs) if a not in rhs), None)
    n = next((a for a in reversed(rhs) if a not in lhs), None)
    lead = [a for a in res if a not in (m, n)]

    def target(labels: list[str], tail: list[str | None]) -> list[str | None]:
        first = next((i for i, a in enumerate(lead) if a in labels), len(lead))
        return [a if a in labels else None for a in lead[first:]] + tail

    return {"lhs": lhs, "rhs": rhs, "out": res, "size": size,
            "lhs_target": target(lhs, [m, k]), "rhs_target": target(rhs, [k, n]),
            "product": [*lead, m, n]}


def _lower_as_matmul(ctx, eqn) -> bool:
    import numpy as np
    import onnx_ir as ir
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
    from jax2onnx.plugins.jax.lax._index_utils import _const_i64

    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    dtypes = {np.dtype(v.aval.dtype) for v in eqn.invars}
    plan = matmul_plan(eqn.params["equation"], shapes)
    if plan is None or len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
        return False
    dtype = eqn.invars[0].aval.dtype
    size = plan["size"]

    def typed(value, labels):
        value.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
        _stamp_type_and_shape(value, tuple(1 if a is None else size[a] for a in labels))
        _ensure_value_metadata(ctx, value)
        return value

    def arrange(value, labels: list[str], target: list[str | None]):
        present = [a for a in target if a is not None]
        perm = [labels.index(a) for a in present]
        if perm != list(range(len(labels))):
            value = typed(ctx.builder.Transpose(value, _outputs=[ctx.fresh_name("einsum_mm_T")],
                                                perm=perm), present)
        ones = [i for i, a in enumerate(target) if a is None]
        if ones:
            axes = _const_i64(ctx, np.asarray(ones, np.int64), "einsum_mm_axes")
            value = typed(ctx.builder.Unsqueeze(value, axes, _outputs=[ctx.fresh_name("einsum_mm_U")]),
                          target)
        return value

    lhs = arrange(ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("einsum_in")),
                  plan["lhs"], plan["lhs_target"])
    rhs = arrange(ctx.get_value_for_var(eqn.invars[1], name_hint=ctx.fresh_name("einsum_in")),
                  plan["rhs"], plan["rhs_target"])
    out_var = eqn.outvars[0]
    out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("einsum_out"))
    final = getattr(out_spec, "name", None) or ctx.fresh_name("einsum_out")
    producer = getattr(out_spec, "producer", None)
    if callable(producer) and producer() is not None:
        final = ctx.fresh_name("einsum_out")
    product = plan["product"]
    squeeze = [i for i, a in enumerate(product) if a is None]
    kept = [a for a in product if a is not None]
    perm = [kept.index(a) for a in plan["out"]]
    steps = ["matmul", *(["squeeze"] if squeeze else []), *(["transpose"] if perm != sorted(perm) else [])]
    name = lambda step: final if step == steps[-1] else ctx.fresh_name(f"einsum_mm_{step}")  # noqa: E731
    value = typed(ctx.builder.MatMul(lhs, rhs, _outputs=[name("matmul")]), product)
    if squeeze:
        axes = _const_i64(ctx, np.asarray(squeeze, np.int64), "einsum_mm_axes")
        value = typed(ctx.builder.Squeeze(value, axes, _outputs=[name("squeeze")]), kept)
    if "transpose" in steps:
        value = typed(ctx.builder.Transpose(value, _outputs=[name("transpose")], perm=perm), plan["out"])
    ctx.bind_value_for_var(out_var, value)
    return True

