"""Runs method files' main() one after another in each process of one torchrun launch, for
test_distributed.py: the process group is set up once and kept between the methods (each method
ends it when it runs alone), which saves a launch, and so seconds, per method.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py JOBS.json ERRORS.json

JOBS.json: a list of [module, argv]; ERRORS.json (written by rank 0): the message each job that
exited printed, by its index.
"""
import importlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

dist.init_process_group("gloo")
end_group, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
errors = {}
for i, (module, argv) in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    try:
        importlib.import_module(module).main(argv)
    except SystemExit as e:
        errors[i] = str(e.code)
if os.environ["RANK"] == "0":
    Path(sys.argv[2]).write_text(json.dumps(errors))
end_group()
