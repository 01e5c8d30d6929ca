"""Memory of the LoRA family on GPU: bytes per base parameter of the 4-bit layers, and (on CUDA) the peak memory
of one training step for LoRA, LoRA-FA, Delta-LoRA, DoRA on a bf16 base and LoRA on a 4-bit base.

Model: 4 decoder layers of Llama-3.2-1B's shape (hidden 2048, MLP 8192, 32/8 heads), random seeded weights;
r=16 on every linear layer, fp32 adapters, AdamW through lorakit.optim.create_optimizer (which wires Delta-LoRA's
update), bf16 autocast, batch 2 x 512 tokens; peak = torch.cuda.max_memory_allocated over two steps.
4-bit backends: "torch" (lorakit's pure-PyTorch NF4, any device) and, on CUDA, "bitsandbytes" (Linear4bit, NF4
with double quantization, the field's standard).

Run: python benchmarks/memory_gpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.optim import create_optimizer
from lorakit.quant import quantize_model


def llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16)


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(stored bytes of the quantized linear weights incl. their scales, their parameter count)."""
    stored, params = 0, 0
    for module in model.modules():
        name = type(module).__name__
        if name == "NF4Linear":
            stored += module.storage_bytes()
            params += module.in_features * module.out_features
        elif name == "Linear4bit":
            weight = module.weight
            state = weight.quant_state
            stored += weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:  # double quantization: the absmax's own absmax and code
                stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
                stored += state.state2.code.numel() * state.state2.code.element_size()
            params += module.in_features * module.out_features
    return stored, params


def peak_step_gib(quantized: bool = False, **variant) -> float:
    model = llama()
    if quantized:
        quantize_model(model, skip=("lm_head",), backend="bitsandbytes")
    config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **variant)
    model = get_lora_model(model.cuda(), config)
    optimizer = create_optimizer(model, torch.optim.AdamW, lr=1e-4)
    ids = torch.randint(0, 32000, (2, 512), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    return round(peak, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"date": str(date.today()), "device": device, "torch": torch.__version__}
    stored, params = linear_bytes(quantize_model(llama(2), skip=("lm_head",), backend="torch"))
    result["torch_nf4_bytes_per_param"] = round(stored / params, 4)
    if torch.cuda.is_available():
        stored, params = linear_bytes(quantize_model(llama(2), skip=("lm_head",), backend="bitsandbytes"))
        result["bitsandbytes_nf4_bytes_per_param"] = round(stored / params, 4)
        peaks = {
            "lora": peak_step_gib(),
            "lora_fa": peak_step_gib(variant="lora_fa"),
            "delta_lora": peak_step_gib(variant="delta_lora"),
            "dora": peak_step_gib(use_dora=True),
            "lora on 4-bit base (qlora)": peak_step_gib(quantized=True),
        }
        result["peak_train_step_gib"] = peaks
        result["peak_vs_lora"] = {name: round(peak / peaks["lora"], 3) for name, peak in peaks.items()}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
