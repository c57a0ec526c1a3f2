"""Fault injection: make one worker's kernels misbehave, so users can prove their checks catch it.

Spec grammar (one fault per `--inject`, or several joined by ';'):

    KIND:key=value,key=value

    bitflip:rank=2,bit=20,rate=0.01   flip bit 20 of a fraction 0.01 of output elements
                                      (no rate: exactly one element per call)
    stuck:rank=0,bit=3,value=1        force bit 3 to `value` in a fraction `rate` (default 1e-3)
    nan:rank=0                        one output element becomes NaN (rate= for more)
    slow:rank=1,factor=1.3            every kernel takes `factor` times as long
    hang:rank=3                       the kernel never returns (the watchdog must end it)
    crash:rank=1                      the worker process dies (SIGKILL) inside the kernel

Common keys: `rank` (one rank, or several as 1|3), `probe` (only inside that probe),
`dtype` (only outputs of that dtype, e.g. bfloat16), `op` (aten op name, e.g. mm), `after`
(leave the first N matching calls alone: a chip that fails after warming up), `seed`,
`output` (which floating-point output of the op to corrupt, counting from 0; default the first:
e.g. `op=_scaled_dot_product_flash_attention_for_cpu_backward,output=2` hits dv of (dq, dk, dv)).
Value faults (bitflip, stuck, nan) also take `index` (the flat element index, within each
matching output, to hit on every call instead of random ones: a fixed, repeatable address, e.g.
`stuck:rank=1,bit=3,value=1,index=1000,op=clone,probe=memory` is a stuck cell at byte 4000 of
the memory probe's read-back; an index beyond the output leaves that output alone).
`count` corrupts at most N matching calls after `after` (one bad call: count=1). `at` says when a
value fault lands: `exit` corrupts the outputs when the code under test is left (the probe's
checks see them; the corruption's cost stays out of timing), `call` corrupts an output as its
kernel returns, so later kernels consume the bad bits, as on a real faulty chip. Without `at`,
faults land at `call` in the probes listed in `CALL_TIME_PROBES` (training steps: their backward
reads the forward's outputs, which are dead by the time the step is left) and at `exit` elsewhere.
Collectives: with `op=` naming a c10d op (`send`, `allreduce_`, `broadcast_`, `_allgather_base_`,
`_reduce_scatter_base_`, `alltoall_base_`; the coalesced `allreduce_coalesced_`,
`allgather_into_tensor_coalesced_`, `reduce_scatter_tensor_coalesced_`: their first tensor; `alltoall_`:
the tensor to rank 0), a value fault corrupts the *outgoing* payload before it leaves (a bad NIC or link), `slow` stretches the op
(by `factor - 1` times the time from its start to the rank's next op, at most 1 s of it: the op's work
ends after it returns, when the caller waits), and `peer=N` limits a fault to sends to rank N: `bitflip:rank=1,bit=12,op=send,peer=2,probe=links` corrupts only the link 1 -> 2.

`scope` says where a fault lives. `scope=probe` (the default): the injector is a TorchDispatchMode
entered only around each probe's code under test (the probe's own checks run outside it).
`scope=process`: like real silicon, the fault acts on every matching kernel the faulty rank's
worker process runs, from its first call to its last: model steps, tensor-parallel shards,
warm-ups, the checks' own kernels, reference computations in low precision, the local part of a
collective. Value faults then land as the kernel returns (`at=call`); `probe=` is refused with it.
`after_s=S` leaves every matching call alone for the first S seconds of the run (wall time since
the run began, across the run's worker processes, its retest included): a chip that throttles or
fails once it has run hot for a while (`slow:rank=1,factor=2,after_s=1.5,scope=process`).
`every=N` hits only every Nth matching call (a fault in every 2nd fp32 GEMM: `every=2,dtype=float32`).
`chance=P` makes the fault intermittent: a call it would hit is hit with probability P, drawn from a
generator seeded by `seed` that runs on across the whole process (every injector, every trial), so a
given sequence of calls fails the same way twice while trial after trial of one op fails k of n
times, as a marginal chip does (`bitflip:bit=25,op=mm,chance=0.25`).
`side=recv` (collective ops: c10d's, or JAX's `psum`, ...) corrupts what the rank *receives* instead of
what it sends: the op is waited for and its output corrupted, as a bad receive path would
(`bitflip:rank=2,bit=3,op=allreduce_,side=recv,scope=process`).
A bit index counts from the least significant bit of the output dtype (fp32: 0..31, sign 31;
bf16/fp16: 0..15); a bit beyond the dtype's width leaves that dtype alone (with `dtype=`, such a bit is
refused: the fault could never fire).
"""

from .firing import CHANCE_DRAWS, HITS, Firing, chance_draw
from .inject import (
    corrupt,
    fake_mode_active,
    make_injector,
    process_injector,
    start_process_faults,
)
from .spec import (
    CALL_TIME_PROBES,
    CHIP_FAULTS,
    DEFAULT_OPS,
    EPOCH_ENV,
    KINDS,
    SCOPES,
    Fault,
    InjectSpecError,
    never_fires,
    parse,
    unreachable,
)

__all__ = ["CALL_TIME_PROBES", "CHIP_FAULTS", "DEFAULT_OPS", "EPOCH_ENV", "KINDS", "SCOPES", "CHANCE_DRAWS", "Fault", "HITS",
           "Firing", "InjectSpecError", "chance_draw", "corrupt", "fake_mode_active", "make_injector", "parse",
           "process_injector", "never_fires", "start_process_faults", "unreachable"]
