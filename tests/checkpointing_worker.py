"""One rank of tests/test_distributed.py's gradient checkpointing check (torchrun --nproc_per_node=2).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/checkpointing_worker.py OUT

For DDP and FSDP2 (wrapped as train.py wraps), full fine-tuning and LoRA (adapters with a non-zero B):
each rank scores its own prompt's completions, once on the plain path without checkpointing and once
on the prompt-sharing path with gradient checkpointing, and writes OUT/rank{r}.json: per configuration,
the largest difference between the two gradients (after DDP's averaging, FSDP's reduce-scatter), the
largest gradient, and the gradients' sum (equal on both ranks once synchronised).
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from grpo_min import dist, lora, tiny  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts  # noqa: E402
from grpo_min.rollout import completion_logps  # noqa: E402
from tests.fixtures import plain_logps  # noqa: E402

G, T = 2, 6


def gradients(model, prompts, ids, mask, score=completion_logps) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logps = score(model, prompts, ids, mask, group_size=G)  # (G, T)
    ((logps * mask).sum() / mask.sum()).backward()
    grads = {}
    for name, p in dist.unwrap(model).named_parameters():
        if p.grad is not None:
            grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()  # FSDP: a DTensor
    return grads


def main():
    out = Path(sys.argv[1])
    dist.setup()
    rank = dist.rank()
    processor = tiny.build_processor()
    sample = data.synthetic_sample(rank, "val")  # each rank its own prompt: the gradients differ before syncing
    prompts = encode_prompts(processor, [sample.load_image()], [sample.text], CHAIN_OF_BOX)
    ids = torch.randint(10, 200, (G, T), generator=torch.Generator().manual_seed(rank))  # (G, T)
    mask = torch.ones(G, T)
    mask[1, 4:] = 0  # the second completion ended early
    result = {}
    for kind in ("ddp", "fsdp"):
        for lora_r in (0, 4):
            torch.manual_seed(0)  # the same weights and adapters on both ranks (FSDP2 does not broadcast them)
            model = tiny.build_model(processor, seed=0)
            if lora_r:
                lora.add_lora(model, r=lora_r, lora_alpha=2 * lora_r)
                for layer in lora.lora_layers(model).values():
                    torch.nn.init.normal_(layer.lora_B.weight, std=0.05, generator=torch.Generator().manual_seed(1))
            model = dist.wrap(model.train(), fsdp=kind == "fsdp")
            plain = gradients(model, prompts, ids, mask, score=plain_logps)
            dist.unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            checkpointed = gradients(model, prompts, ids, mask)
            assert plain.keys() == checkpointed.keys() and plain
            result[f"{kind}-{'lora' if lora_r else 'full'}"] = {
                "max_diff": max((checkpointed[n] - g).abs().max().item() for n, g in plain.items()),
                "max_grad": max(g.abs().max().item() for g in plain.values()),
                "grad_sum": sum(g.double().sum().item() for g in checkpointed.values()),
            }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.cleanup()


if __name__ == "__main__":
    main()
