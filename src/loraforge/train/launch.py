"""`loraforge train --nproc N`: the same command line, run N times through torch.distributed.run.

No launcher of our own: torchrun's (in this process) starts the ranks on this machine, gives them their
RANK / WORLD_SIZE / MASTER_PORT, and stops them all when one fails. Several machines take torchrun's own
flags (`torchrun --nnodes 2 --rdzv-endpoint HOST:PORT ... -m loraforge train ...`).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from ..errors import LoraForgeError


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(argv: list[str], nproc: int, out: Path) -> int:
    """Run `loraforge <argv without --nproc>` on `nproc` local processes; one line if any of them fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # the ranks speak for themselves (rank 0's log, any rank's error); torchrun's own failure report is a
    # page of tables on top, which this function replaces by one line
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # torchrun would set 1 thread per process (and warn); share this machine's cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "loraforge",
                                         *without_nproc(argv)])
    try:
        torchrun(args)
    except ChildFailedError as e:
        # the one that started it: not one torchrun itself stopped (SIGTERM) after another failed; killed by a
        # signal rather than exiting; the first
        rank, failure = min(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM,
                                                                kv[1].exitcode >= 0, kv[1].timestamp, kv[0]))
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(out)
        where = f"the last checkpoint, {last}, is intact (continue with --resume)" if last else "no checkpoint was written"
        raise LoraForgeError(f"training stopped: process {rank} of {nproc} {how}; {where}") from None
    return 0
