"""`attendo` for torchrun in tests/test_train_distributed.py, checking afterwards that each
process's process group was freed when the command finished with it.

torch stops gloo's worker threads (it joins them) only when the group is freed, not when
destroy_process_group merely forgets it; a worker left running as the interpreter exits can die
taking the GIL while it frees a collective's tensors, which aborts the process after a good run.
Whether that abort happens is a race; whether the group was freed is not, so this checks that.

Exit code: attendo's, or 70 when the command succeeded but its process group is still alive.
"""

from __future__ import annotations

import sys
import weakref

import torch.distributed as dist

from attendo.cli import main

groups: list[weakref.ref] = []
join_process_group = dist.init_process_group


def join_and_watch(*args, **kwargs) -> None:
    join_process_group(*args, **kwargs)
    groups.append(weakref.ref(dist.group.WORLD))


dist.init_process_group = join_and_watch
code = main(sys.argv[1:])
if code == 0 and any(group() is not None for group in groups):
    print("the process group outlived the command that used it", file=sys.stderr)
    code = 70
sys.exit(code)
