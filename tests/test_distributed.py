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
    if mode == "fsdp2":
        assert torch.load(f"{out}.keys") == sorted(dist_worker.build().state_dict())
        # The adapter saved from the gathered state dict (save_pretrained read the shards, and failed, before) is the
        # model's (no step was taken); the second process wrote nothing.
        from safetensors.torch import load_file

        saved = load_file(f"{out}.adapter0/adapter_model.safetensors")
        want = dist_worker.build().base_model.adapter_state_dict("default")
        assert saved.keys() == want.keys() and want
        for key in want:
            torch.testing.assert_close(saved[key], want[key], rtol=0, atol=0, msg=key)
        assert not (tmp_path / "grads.pt.adapter1").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["increlora", "adalora", "increlora-built-first"])
def test_rank_allocation_under_ddp_is_one_process_on_the_whole_batch(tmp_path, method):
    """IncreLoRA scored modules from each process's own backward, so processes grew different modules (their models
    silently diverged, DDP averaging gradients of components that meant different things), and drew new components
    from their own random streams; AdaLoRA's module pruned to rank 0 got no gradient, and DDP failed on the next
    step. Both processes now hold the model one process trains on the whole batch. An IncreLoRA model built before
    the process group existed dropped its first step's importance, and grew other modules than one process."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "result"
    mp.spawn(dist_worker.run, args=(2, str(tmp_path / "init"), method, str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    model, optimizer = dist_worker.ranked(method.removesuffix("-built-first"))
    want = dist_worker.train_ranked(model, optimizer, model, 0, 1)
    assert want["events"], "the schedule had no event to compare"
    if method == "adalora":
        assert 0 in want["ranks"].values()  # a module pruned away entirely
    for got in ranks:
        assert got["ranks"] == want["ranks"] and got["events"] == want["events"]
        if want["scores"] is not None:  # the smoothed importance: of the whole batch, not of the process's share
            torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-3, atol=1e-9)
        for name, p in want["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)



@pytest.mark.slow
def test_building_a_ranked_model_on_one_process_runs_no_collective(tmp_path):
    """An IncreLoRA model built by rank 0 alone (to evaluate or export on the main process) broadcast its sampling
    generator at once, over the whole world: rank 0 waited in a collective the other process never joined, until
    the process group's timeout (30 minutes with gloo's default). The generator is now shared at the first
    update_and_allocate, which every process calls; a model is built without any collective, as LoRA's is."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "result"
    mp.spawn(dist_worker.run, args=(2, str(tmp_path / "init"), "built-on-rank0", str(out)), nprocs=2, join=True)
    assert [set(p.values()) for p in torch.load(f"{out}.0")] == [{1}, {4}]
    assert not (tmp_path / "result.1").exists()


@pytest.mark.slow
def test_rank_allocation_under_fsdp2_is_refused_with_the_remedy(tmp_path):
    """IncreLoRA's and AdaLoRA's allocators score and grow whole factors; under FSDP2 those are sharded DTensors, and
    update_and_allocate failed inside an op mixing Tensor and DTensor. It now says FSDP2 is not supported, use DDP."""
    for errors in _per_rank(tmp_path, "ranked-fsdp2"):
        assert [e.split(" is not")[0] for e in errors] == ["IncreLoRA", "IncreLoRA", "AdaLoRA", "AdaLoRA"]
        assert all("FSDP2" in e and "DDP" in e for e in errors)


@pytest.mark.slow
def test_the_orthogonality_term_with_reentrant_checkpointing_under_ddp_says_the_remedy(tmp_path):
    """The term reads every factor outside the checkpointed layers, whose reentrant backward reads them again: DDP
    failed with "marked as ready twice" (static_graph: parameters that "did not receive grad"), naming no remedy.
    A warning says it first (an error would refuse IncreLoRA under static_graph=True, which works)."""
    for said in _per_rank(tmp_path, "ranked-reentrant"):
        kinds = [("use_reentrant': False" in s, "Expected to mark" in s) for s in said]
        assert kinds == [(True, False), (False, True)] * 2, said


def _per_rank(tmp_path, mode: str) -> list:
    """What each of two processes running dist_worker's `mode` saved."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "result"
    mp.spawn(dist_worker.run, args=(2, str(tmp_path / "init"), mode, str(out)), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]
