"""What the static GPU audit (``python -m radio_kernels.audit``) compiles.

A kernel module takes part by defining a module-level ``AUDIT_CONFIGS``: a list of
:class:`AuditConfig` (or a zero-argument function returning one, to keep import cheap). Each entry
is one launch the host wrapper can actually make: the kernel, the type of every runtime argument,
the values of its ``tl.constexpr`` arguments and the launch options. The audit imports every
module of the ``radio_kernels`` package and collects these lists; nothing else to register.

:func:`signature_of` builds the signature from a few typed names so an entry stays short::

    AuditConfig(
        kernel=_my_kernel,
        label="bf16 BLOCK_C=256",
        signature=signature_of(_my_kernel, ptrs={"x_ptr": "bf16", "out_ptr": "fp32"}, ints=("n", "C")),
        constexprs={"BLOCK_R": 8, "BLOCK_C": 256},
        num_warps=4,
        uses_dot=False,
    )

Conventions that mirror what the JIT sees at launch: pointers are marked 16-byte aligned (every
torch allocation is); integer arguments are ``i32`` unless a config says otherwise; an argument a
config wants specialised (e.g. a unit channel stride, which the JIT turns into a constant) goes in
``constexprs`` like any ``tl.constexpr`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Triton's names for the tensor dtypes the ops accept.
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class AuditConfig:
    kernel: object  # a @triton.jit function
    label: str  # short human description: dtypes and block sizes
    signature: dict[str, str]  # every argument -> "*fp32", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False  # check that sm_90 SASS uses Hopper tensor cores (HGMMA)
    aligned: tuple[str, ...] = field(default=())  # extra i32 arguments known to be multiples of 16

    @property
    def name(self) -> str:
        return self.kernel.__name__


def signature_of(
    kernel,
    ptrs: dict[str, str],
    ints: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    i64: tuple[str, ...] = (),
    constexpr: tuple[str, ...] = (),
) -> dict[str, str]:
    """Signature dict for ``kernel`` in argument order; raises if an argument is left untyped.

    ``ptrs`` maps pointer arguments to their element type ("bf16", "fp32", "i64", ...); ``ints``,
    ``floats`` and ``i64`` list scalar arguments; ``constexpr`` lists arguments given as constants
    (``tl.constexpr`` parameters are found automatically).
    """
    params = kernel.params
    sig = {}
    for p in params:
        name = p.name
        if p.is_constexpr or name in constexpr:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ints:
            sig[name] = "i32"
        elif name in i64:
            sig[name] = "i64"
        elif name in floats:
            sig[name] = "fp32"
        else:
            raise ValueError(f"argument {name!r} of {kernel.__name__} has no type in its audit signature")
    return sig
