"""Worker of tests/test_distributed.py: one rank of a 2-process CPU (gloo) run."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

BATCH, LENGTH = 4, 7


def batch():
    return torch.randint(1, 95, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def build():
    from hf_models import FAMILIES

    import pefttorch

    torch.manual_seed(0)
    model = FAMILIES["llama"].build()
    return pefttorch.get_peft_model(model, pefttorch.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False, lora_dropout=0.0))


def single_process_grads() -> dict[str, torch.Tensor]:
    model = build()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


STEPS = 8


def ranked(method: str):
    """A model with IncreLoRA or AdaLoRA whose schedule has events within STEPS steps, and its optimizer."""
    from hf_models import FAMILIES

    import pefttorch

    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    config = (pefttorch.IncreLoraConfig(target_modules=targets, target_rank=4, init_rank=1, incre_interval=2,
                                        init_warmup=1, top_h=1, incre_rank_num=2, max_rank_per_module=4)
              if method == "increlora" else
              pefttorch.AdaLoraConfig(target_modules=targets, init_r=4, target_r=1, tinit=1, tfinal=2, deltaT=1,
                                      total_step=STEPS))
    model = pefttorch.get_peft_model(FAMILIES["llama"].build(), config)
    return model, pefttorch.optim.RankAwareAdamW(model.parameters(), lr=1e-2)


def train_ranked(model, optimizer, step_model, rank: int, world: int) -> dict:
    for step in range(STEPS):
        ids = torch.randint(1, 95, (BATCH, LENGTH), generator=torch.Generator().manual_seed(200 + step))
        ids = ids.chunk(world)[rank]
        step_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    allocator = model.base_model.allocator
    scores = allocator.ipt.clone() if isinstance(allocator.ipt, torch.Tensor) else None  # IncreLoRA's, per module
    return {"ranks": model.rank_pattern(), "events": allocator.events, "scores": scores,
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def run(rank: int, world: int, init_file: str, mode: str, out: str) -> None:
    # most training scripts build the model first, before the process group exists
    early = ranked("increlora") if mode == "increlora-built-first" else None
    # a collective that only one process joins fails after this timeout instead of hanging the test
    timeout = datetime.timedelta(seconds=30 if mode == "built-on-rank0" else 1800)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        if mode == "built-on-rank0":  # evaluating or exporting on the main process only: no collective in the build
            from hf_models import FAMILIES  # noqa: F401  (the other process then waits only for the build itself)

            import pefttorch  # noqa: F401

            if rank == 0:
                models = [ranked(method)[0] for method in ("increlora", "adalora")]
                torch.save([m.rank_pattern() for m in models], f"{out}.{rank}")
            dist.barrier()
            return
        if mode == "ranked-fsdp2":  # refused with the remedy, not an error inside an op mixing Tensor and DTensor
            from torch.distributed.fsdp import fully_shard

            errors = []
            for method in ("increlora", "adalora"):
                model = ranked(method)[0]
                fully_shard(model)
                # the orthogonality term of every training forward (it failed inside torch.stack) and the allocation
                for call, args in ((model.base_model.orth_regularization, ()), (model.update_and_allocate, (0,))):
                    try:
                        call(*args)
                    except NotImplementedError as e:
                        errors.append(str(e))
            torch.save(errors, f"{out}.{rank}")
            dist.barrier()
            return
        if mode == "ranked-reentrant":  # the orthogonality term and reentrant checkpointing: the remedy said first
            import warnings

            said = []
            for method in ("increlora", "adalora"):
                model = ranked(method)[0]
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
                ddp = torch.nn.parallel.DistributedDataParallel(model.train())
                ids = batch().chunk(world)[rank]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loss = ddp(input_ids=ids, labels=ids).loss
                said += [str(w.message) for w in caught if "use_reentrant" in str(w.message)]
                try:
                    loss.backward()
                except RuntimeError as e:  # DDP's own words follow
                    said.append(str(e))
            torch.save(said, f"{out}.{rank}")
            dist.barrier()
            return
        if mode in ("increlora", "adalora", "increlora-built-first"):
            model, optimizer = early or ranked(mode)
            torch.save(train_ranked(model, optimizer, torch.nn.parallel.DistributedDataParallel(model), rank, world),
                       f"{out}.{rank}")
            dist.barrier()
            return
        model = build()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
            named = model.module.named_parameters
        elif mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.get_base_model().model.layers:
                fully_shard(layer)
            fully_shard(model)
            named = model.named_parameters
        else:
            raise ValueError(mode)
        ids = batch().chunk(world)[rank]  # equal shares: the mean of the ranks' losses is the full batch's
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {}
        for n, p in named():
            if p.requires_grad:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[n] = g.detach().clone()
        if rank == 0:
            torch.save(grads, out)
            if mode == "fsdp2":  # its DTensors have no storage to compare for aliases: the state dict still lists all
                torch.save(sorted(model.state_dict()), f"{out}.keys")
        if mode == "fsdp2":  # saving the adapter of a sharded model: the full state dict, gathered by every rank
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            model.save_pretrained(f"{out}.adapter{rank}", is_main_process=rank == 0, state_dict=full)
        # both ranks done with every collective before either tears gloo down (a rank once aborted in teardown,
        # "terminate called without an active exception", on a loaded CI machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: under load, gloo's threads still raced its static destructors
    # there ("terminate called without an active exception", SIGABRT) after every result was written. A rank that
    # raised never gets here: spawn reports its error as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
