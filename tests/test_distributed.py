"""pefttorch LoRA models train under PyTorch's own engines (DDP, FSDP2) with the gradients of one process."""

from __future__ import annotations

import dist_worker
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "grads.pt"
    mp.spawn(dist_worker.run, args=(2, str(tmp_path / "init"), mode, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    want = dist_worker.single_process_grads()
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
