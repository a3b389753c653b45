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

``archs`` lists the architectures the wrapper launches the entry on (a per-arch tile table gives
one entry per arch; the audit merges entries that compile to the same binary, see
:func:`merge_duplicates`). ``expect_wgmma=True`` makes the audit fail unless the sm_90 SASS uses
HGMMA (and the sm_100 SASS tcgen05's UTCHMMA), ``expect_tma=True`` unless the SASS loads through
the tensor-memory accelerator (UTMALDG); ``sample=True`` puts the entry in the quick ``--sample`` subset.

Conventions that mirror what the JIT sees at launch: pointers are marked 16-byte aligned (every
torch allocation is); integer arguments are ``i32`` unless a config says otherwise; an argument a
config wants specialised (e.g. a unit channel stride, which the JIT turns into a constant) goes in
``constexprs`` like any ``tl.constexpr`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

#: Triton's names for the tensor dtypes the ops accept.
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


#: The architectures (compute capability x 10) the audit compiles for: H100/H200, B200 (sm_100),
#: A100, RTX 30xx / A10 (sm_86), RTX 40xx / L4 / L40 (sm_89) and RTX 50xx (sm_120).
ARCHS = (90, 100, 80, 86, 89, 120)


@dataclass(frozen=True)
class AuditConfig:
    kernel: object  # a @triton.jit function
    label: str  # short human description: dtypes and block sizes
    signature: dict[str, str]  # every argument -> "*fp32", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False  # report which tensor-core instructions the SASS uses (HGMMA / HMMA)
    aligned: tuple[str, ...] = field(default=())  # extra i32 arguments known to be multiples of 16
    archs: tuple[int, ...] = ARCHS  # the architectures a host wrapper launches this config on
    expect_wgmma: bool = False  # fail unless the SASS uses the async tensor cores (sm_90 HGMMA, sm_100 tcgen05)
    expect_tma: bool = False  # fail unless the sm_90+ SASS loads through the tensor-memory accelerator (UTMALDG)
    max_regs: int | None = None  # the launch's ``maxnreg`` (registers per thread ptxas may use)
    sample: bool = False  # compiled by ``--sample`` (kernels flagging none: their first and last)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def binary_key(self) -> tuple:
        """Everything ``triton.compile`` sees: equal keys give the same binary on a given arch."""
        return (
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted(self.constexprs.items())),
            self.num_warps,
            self.num_stages,
            tuple(sorted(self.aligned)),
            self.max_regs,
        )


def merge_duplicates(configs: list[AuditConfig]) -> list[AuditConfig]:
    """One config per binary: entries with equal ``binary_key`` merged, in first-seen order.

    The merged entry ships to the union of the archs, carries every distinct label (joined with
    " | ") and keeps ``uses_dot`` / ``expect_wgmma`` / ``sample`` if any entry set them.
    """
    merged: dict[tuple, AuditConfig] = {}
    for cfg in configs:
        prev = merged.get(cfg.binary_key)
        if prev is None:
            merged[cfg.binary_key] = cfg
            continue
        labels = prev.label.split(" | ")
        merged[cfg.binary_key] = replace(
            prev,
            label=" | ".join(labels + [cfg.label] * (cfg.label not in labels)),
            archs=tuple(a for a in ARCHS if a in prev.archs or a in cfg.archs),
            uses_dot=prev.uses_dot or cfg.uses_dot,
            expect_wgmma=prev.expect_wgmma or cfg.expect_wgmma,
            expect_tma=prev.expect_tma or cfg.expect_tma,
            sample=prev.sample or cfg.sample,
        )
    return list(merged.values())


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
