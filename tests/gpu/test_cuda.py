"""On CUDA only (skipped elsewhere): LoRA on bitsandbytes' 4-bit layers, against a dequantized reference and
against PEFT (files both ways); FSDP2 over NCCL on two GPUs, against DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LoraModel, VeraConfig, get_lora_model
from lorakit.kinds import Bnb4bitKind
from lorakit.quant import quantize_model
from tests.gpu.models import block_mlp_run

ROOT = Path(__file__).resolve().parents[2]
needs_bnb = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="LoRA on bitsandbytes 4-bit layers needs CUDA and bitsandbytes",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs two GPUs"
)


def _quantized_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).to(torch.bfloat16)
    return quantize_model(mlp, backend="bitsandbytes")


@needs_cuda
def test_vera_moved_to_the_gpu_keeps_one_pair_and_the_cpu_outputs() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64))
    model = get_lora_model(mlp, VeraConfig(r=8, target_modules=["0", "2", "4"])).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.add_(torch.randn_like(param))
    x = torch.randn(16, 64)
    with torch.no_grad():
        expected = model(x)
        model.cuda()
        got = model(x.cuda()).cpu()
    adapters = [m for m in model.modules() if hasattr(m, "vera_lambda_d")]
    assert len({a.vera_shared.vera_A.data_ptr() for a in adapters}) == 1
    assert adapters[0].vera_shared.vera_A.is_cuda
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # GPU kernels sum in another order


@needs_bnb
def test_lora_on_bnb_4bit_is_dequantized_linear_plus_lora_and_trains_only_the_factors() -> None:
    model = get_lora_model(_quantized_mlp(), LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False))
    layer = model.model[0]
    assert isinstance(layer.kind, Bnb4bitKind) and type(layer.base_layer).__name__ == "Linear4bit"
    adapter = layer.adapters["default"]
    assert adapter.lora_A.shape == (8, 256) and adapter.lora_B.shape == (512, 8)  # from in/out, not packed bytes
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    weight = layer.weight.float()  # dequantized NF4
    want = x.float() @ weight.T + layer.bias.float() + adapter.scale * x.float() @ adapter.lora_A.T @ adapter.lora_B.T
    torch.testing.assert_close(layer(x).float(), want, atol=0.1, rtol=0.02)  # bf16 base product
    model(x).float().square().mean().backward()
    assert adapter.lora_A.grad is not None and adapter.lora_B.grad is not None
    assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)


@needs_bnb
def test_merging_into_bnb_4bit_requantizes_within_nf4_error() -> None:
    model = get_lora_model(_quantized_mlp(), LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    layer = model.model[0]
    want = (layer.weight.float() + layer.adapters["default"].delta_weight().float()).detach()
    merged = model.merge_and_unload()
    assert type(merged[0]).__name__ == "Linear4bit"  # still 4-bit
    got = Bnb4bitKind().weight_of(merged[0]).float()
    blocks, err = want.flatten().reshape(-1, 64), (got - want).flatten().reshape(-1, 64).abs()
    assert (err <= blocks.abs().amax(1, keepdim=True) * 0.17).all()  # half NF4's widest gap, plus absmax rounding


@needs_bnb
def test_qlora_adapter_files_both_ways_with_peft(tmp_path: Path) -> None:
    import peft

    config = dict(r=8, lora_alpha=16, target_modules=["0", "2"], init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_quantized_mlp(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft")
    ours = LoraModel.from_pretrained(_quantized_mlp(), tmp_path / "peft")  # the same quantized base (same seed)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).float(), theirs(x).float(), atol=1e-2, rtol=1e-2)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_quantized_mlp(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(x).float(), ours(x).float(), atol=1e-2, rtol=1e-2)


@needs_two_gpus
def test_fsdp2_over_nccl_matches_ddp(tmp_path: Path) -> None:
    """The block MLP sharded over two GPUs trains to the same per-step losses and adapter as DDP replicas (both with
    the CUDA default run.compile = auto: each block compiled; the replicas' blocks replayed as CUDA graphs)."""
    from safetensors.torch import load_file

    config = block_mlp_run(tmp_path, rows=256, batch_size=16, max_steps=6)
    outs = {mode: tmp_path / mode for mode in ("ddp", "fsdp")}
    for mode, out in outs.items():
        _torchrun_train(config, out, f"--run.distributed={mode}")

    def losses(folder: Path) -> list[float]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train"]

    assert len(losses(outs["ddp"])) == 6
    graphs = {m: json.loads((out / "summary.json").read_text())["cuda_graphs"] for m, out in outs.items()}
    assert graphs == {"ddp": True, "fsdp": False}  # run.compile_mode = auto: graphs under ddp, none under FSDP2
    assert losses(outs["fsdp"]) == pytest.approx(losses(outs["ddp"]), rel=1e-4)
    a, b = (load_file(outs[m] / "adapter" / "adapter_model.safetensors") for m in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


def _torchrun_train(config: Path, out: Path, *overrides: str, timeout: float = 120) -> None:
    """`lorakit train` on two processes, meeting on a free port of 127.0.0.1 (no host name lookup). Past `timeout`,
    torchrun gets SIGTERM, on which it stops its workers; killing it outright would leave them holding the GPUs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    no_multicast = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    env = {**os.environ, **no_multicast, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "lorakit.train", "train", str(config), f"--run.out_dir={out}",
               *overrides]  # fmt: skip
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            output, _ = process.communicate(timeout=30)
            pytest.fail(f"torchrun {overrides} ran past {timeout} s; the end of its output:\n{output[-3000:]}")
    assert process.returncode == 0, output[-6000:]


def _word_gpt2(folder: Path) -> Path:
    """A small GPT-2 with a word-level tokenizer built here, so the run needs no packaged model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["the", "cat", "dog", "sat", "ran", "on", "in", "mat", "park", "a"]
    vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]", "[EOS]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=64, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@needs_cuda
def test_causal_lm_run_on_cuda_with_bf16_autocast_and_gradient_checkpointing(tmp_path: Path, monkeypatch) -> None:
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    model = _word_gpt2(tmp_path / "gpt2")
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\nthe dog ran in the park\n" * 40)
    (tmp_path / "lm.toml").write_text(f"""
task = "causal-lm"
[model]
source = "{model}"
gradient_checkpointing = true
[data]
path = "{tmp_path / "lines.txt"}"
[lora]
target_modules = ["c_attn", "c_fc"]
[optim]
lr = 0.02
batch_size = 8
max_steps = 30
precision = "auto"
[run]
out_dir = "{tmp_path / "run"}"
progress = "none"
""")
    calls = {"autocast": 0}
    real_autocast = torch.autocast

    def counting_autocast(device_type, *args, **kwargs):  # the loop must autocast to bf16 on CUDA
        if device_type == "cuda" and kwargs.get("dtype") == torch.bfloat16 and kwargs.get("enabled", True):
            calls["autocast"] += 1
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", counting_autocast)
    result = train(load_config(tmp_path / "lm.toml"))
    assert calls["autocast"] >= 30
    assert result.after["perplexity"] < 0.5 * result.before["perplexity"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)("the cat sat on the mat", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    tuned = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), Path(result.folder) / "adapter")
    with torch.no_grad():
        tuned_loss, base_loss = tuned.eval()(input_ids=ids, labels=ids).loss, base(input_ids=ids, labels=ids).loss
    assert tuned_loss.exp() < 0.5 * base_loss.exp(), (tuned_loss, base_loss)  # perplexity at least halved


@needs_cuda
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dora_on_a_bf16_base_follows_float64_math_in_outputs_and_gradients(factor_dtype, compiled, monkeypatch):
    """A linear layer with one DoRA adapter computes (m/n) * (W x + s B A x) + b through the fused op on CUDA: the
    same outputs and gradients (x, A, B, m) as the float64 model on the CPU, to bf16's precision."""
    import copy

    from lorakit.variants.dora import Dora

    whole, calls = Dora.linear_output, []
    monkeypatch.setattr(Dora, "linear_output", lambda *a: calls.append(1) or whole(*a))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 64))
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False, target_modules=["0", "2"])
    exact = get_lora_model(copy.deepcopy(mlp).double(), config).train()
    with torch.no_grad():  # magnitudes away from the norm, so m/n != 1 takes part
        for name, p in exact.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    ours = get_lora_model(copy.deepcopy(mlp).to("cuda", torch.bfloat16), config, adapter_dtype=factor_dtype).train()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), exact.parameters(), strict=True):
            p.copy_(q)
    x = torch.randn(5, 7, 96, dtype=torch.float64)
    weight = torch.randn(5, 7, 64, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.to("cuda", torch.bfloat16).requires_grad_()]
    run = torch.compile(ours) if compiled else ours
    ys = [exact(xs[0]), run(xs[1])]
    assert calls, "the fused DoRA output was not used"
    for y, w in zip(ys, (weight, weight.to("cuda", torch.bfloat16)), strict=True):
        (y.float() * w.float()).sum().backward()
    scale = ys[0].abs().max().item()
    torch.testing.assert_close(ys[1].double().cpu(), ys[0].detach(), atol=2e-2 * scale, rtol=0)
    grads = [(xs[0].grad, xs[1].grad)]
    grads += [(q.grad, p.grad) for p, q in zip(ours.parameters(), exact.parameters(), strict=True) if p.requires_grad]
    assert len(grads) == 1 + 6  # x; A, B and m of both layers
    for want, got in grads:
        torch.testing.assert_close(got.double().cpu(), want, atol=3e-2 * want.abs().max().item(), rtol=0)


@needs_cuda
def test_parallel_training_on_cuda_with_fp32_factors_on_a_bf16_base_follows_float64_math(monkeypatch) -> None:
    """ParallelTrainer's default on a GPU (fp32 master factors, bf16 base, no autocast): jobs alike run as one batch
    per layer (in fp32, where a routed layer sums fp32 factors' terms). Each job's first update (SGD: the update is
    the gradient) is measured against float64 math from the same factors, and must be no further from it than twice
    the single-adapter fused op's own bf16 error (or 1 % of the update)."""
    import copy

    from lorakit import ops
    from lorakit.multi.parallel import ParallelJob, ParallelTrainer, add_seeded_adapter, mean_cross_entropy
    from tests.cases import tiny_llama

    batched = []
    monkeypatch.setattr(ops, "_batched_spans", lambda *a, f=ops._batched_spans: batched.append(1) or f(*a))
    base = tiny_llama().to("cuda", torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (3, 1, 16), generator=gen).cuda()]
    jobs = [ParallelJob(f"job{i}", config, [data[i]], steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                        seed=i) for i in range(3)]  # fmt: skip
    trainer = ParallelTrainer(copy.deepcopy(base), jobs)
    start = {job.name: [p.detach().clone() for p in trainer.parameters_of(job.name)] for job in jobs}
    trainer.run()
    assert batched

    def first_update(model: LoraModel, name: str, device: str, dtype: torch.dtype) -> torch.Tensor:
        add_seeded_adapter(model, name, config, 0)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, q in zip(params, start[name], strict=True):
                p.copy_(q)
        ids = data[int(name[-1])]["input_ids"].to(device)
        mean_cross_entropy(model(input_ids=ids).logits.to(dtype), ids).backward()
        return torch.cat([-0.5 * p.grad.flatten().double().cpu() for p in params])

    for job in jobs:
        exact = first_update(LoraModel(copy.deepcopy(base).to("cpu", torch.float64)), job.name, "cpu", torch.float64)
        alone = first_update(LoraModel(copy.deepcopy(base)), job.name, "cuda", torch.float32)
        moved = torch.cat([(p - q).flatten().double().cpu()
                           for p, q in zip(trainer.parameters_of(job.name), start[job.name], strict=True)])  # fmt: skip
        assert exact.norm() > 0
        ours, fused = (moved - exact).norm(), (alone - exact).norm()
        assert ours <= max(2 * fused, 0.01 * exact.norm()), (job.name, ours / exact.norm(), fused / exact.norm())


@needs_cuda
@pytest.mark.parametrize("variant", ["lora", "dora", "multiple"])
def test_blocks_under_cuda_graphs_train_as_the_default_compile_does(tmp_path: Path, variant: str, monkeypatch) -> None:
    """run.compile_mode = auto picks reduce-overhead for text padded to max_length, or to multiples of 8 up to it
    ("multiple": batches of two lengths, each recorded once): each GPT-2 block replays as CUDA graphs. Two
    micro-batches a step (the first one's gradients must survive the second's replay) and an eval every two steps
    (graphs recorded without grad between training steps): the losses, eval perplexities and adapter equal those
    of the default mode's compiled blocks, and no graph was skipped."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from lorakit.train import loop
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    model = _word_gpt2(tmp_path / "gpt2")
    long = "the dog ran in the park and the cat sat on the big mat\n" if variant == "multiple" else ""
    (tmp_path / "lines.txt").write_text(("the cat sat on the mat\nthe dog ran in the park\na cat ran\n" + long) * 30)
    padding = 'padding = "longest"\npad_to_multiple_of = 8' if variant == "multiple" else 'padding = "max_length"'
    (tmp_path / "lm.toml").write_text(f"""
task = "causal-lm"
[model]
source = "{model}"
[data]
path = "{tmp_path / "lines.txt"}"
{padding}
max_length = 16
[lora]
target_modules = ["c_attn", "c_fc", "c_proj"]
use_dora = {"true" if variant == "dora" else "false"}
[optim]
lr = 0.02
batch_size = 8
grad_accum = 2
max_steps = 6
precision = "fp32"
[run]
progress = "none"
log_every = 1
eval_every = 2
compile = "on"
tensorboard = false
plots = false
""")
    recorded = []
    release = loop._release_graphs

    def counting_release() -> None:  # the graphs the run recorded, counted before the run lets them go
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        recorded.append(0 if manager is None else sum(len(nodes) for nodes in manager.roots.values()))
        release()

    monkeypatch.setattr(loop, "_release_graphs", counting_release)
    folders = {}
    for mode in ("default", "auto"):  # auto: reduce-overhead, as the text is padded to max_length
        torch._dynamo.reset()
        counters.clear()
        overrides = [f"run.compile_mode={mode}", f"run.out_dir={tmp_path / mode}"]
        folders[mode] = Path(train(load_config(tmp_path / "lm.toml", overrides)).folder)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(recorded) == 1 and recorded[0] >= 2  # train and eval graphs, from the auto run only
    assert cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False) is None  # let go

    def records(folder: Path) -> list[tuple[str, int, float]]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["kind"] in ("train", "eval")]
        return [(r["kind"], r["step"], r.get("loss", r.get("perplexity"))) for r in rows]

    summaries = {m: json.loads((folder / "summary.json").read_text()) for m, folder in folders.items()}
    assert not summaries["default"]["cuda_graphs"] and summaries["auto"]["cuda_graphs"]
    default, graphs = records(folders["default"]), records(folders["auto"])
    assert [r[:2] for r in graphs] == [r[:2] for r in default] and len(default) >= 9
    assert [r[2] for r in graphs] == pytest.approx([r[2] for r in default], rel=1e-5)
    a, b = (load_file(folders[m] / "adapter" / "adapter_model.safetensors") for m in folders)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lorafa_optimizer_steps_on_cuda_follow_float64_math(dtype) -> None:
    """create_lorafa_optimizer on the GPU: A A^T inverted in float32 on the device, B's step as float64 math says."""
    from lorakit.optim import create_lorafa_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to("cuda", dtype)
    model = get_lora_model(base, LoraConfig(target_modules=["0", "2"], r=8, lora_alpha=16, init_lora_weights=False))
    opt = create_lorafa_optimizer(model, 8, 16, lr=1e-3)
    x = torch.randn(16, 64, device="cuda", dtype=dtype)
    model(x).float().square().mean().backward()
    before = {}
    for name in ("0", "2"):
        adapter = model.model._modules[name].adapters["default"]
        before[name] = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(), adapter.lora_B.grad.clone())
    opt.step()
    for name, (a, b, grad) in before.items():
        adapter = model.model._modules[name].adapters["default"]
        a64, g64 = a.double(), grad.double()
        projected = g64 @ torch.linalg.inv(a64 @ a64.T + 1e-8 * torch.eye(8, dtype=torch.float64, device="cuda"))
        projected = projected / adapter.scale**2
        step = 1e-3 * (1 - 0.999) ** 0.5 / (1 - 0.9)
        want = b.double() - step * (0.1 * projected) / ((0.001 * projected * projected).sqrt() + 1e-6)
        tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 1e-2}
        torch.testing.assert_close(adapter.lora_B.detach().double(), want, **tol)
        assert torch.equal(adapter.lora_A, a)
