"""The chunked head + loss equals the model's full logits and their cross-entropy, gradients included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import ConfigError, LoraConfig, get_lora_model
from lorakit.head_loss import chunk_rows, head_loss
from lorakit.train import tasks
from lorakit.train.config import DataSection, ModelSection, RunSection, TrainConfig, load_config
from lorakit.train.loop import train
from tests.test_train_helpers import causal_lm_config, tiny_gpt2

IGNORE = tasks.IGNORE


def _reference(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return loss, int(((logits.argmax(-1) == labels) & (labels != IGNORE)).sum())


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1024])  # 7 does not divide the 45 rows
def test_loss_count_and_gradients_equal_the_full_logits_in_float64(chunk_rows: int) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).double()  # a trainable weight and bias
    hidden = torch.randn(45, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (45,))
    labels[::4] = IGNORE
    reference, ref_correct = _reference(hidden, head, labels)
    loss, correct = head_loss(hidden, head, labels, IGNORE, chunk_rows)
    assert correct == ref_correct and torch.allclose(loss, reference.float(), rtol=1e-6)
    wrt = [hidden, head.weight, head.bias]
    for mine, ref in zip(_grads(loss * 0.5, wrt), _grads(reference * 0.5, wrt), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def test_a_head_with_nothing_trainable_gives_the_hidden_gradient_only() -> None:
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 30, (20,))
    (grad,) = _grads(head_loss(hidden, head, labels, IGNORE, 6)[0], [hidden])
    torch.testing.assert_close(grad, _grads(_reference(hidden, head, labels)[0], [hidden])[0], rtol=1e-5, atol=1e-6)


def test_chunks_hold_about_the_same_bytes_of_logits_whatever_the_vocabulary() -> None:
    assert chunk_rows(32_000) == 524 and chunk_rows(128_256) == 130
    assert chunk_rows(10**7) == 16  # a matmul of a few rows still
    assert chunk_rows(128_256, "cpu") == 130 and chunk_rows(128_256, torch.device("cuda", 1)) == 523  # 4x on a GPU


def _frozen_linear(dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 50, bias=bias).to(dtype).requires_grad_(False)


def _hidden_and_labels(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(45, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (45,))
    labels[::4] = IGNORE
    return hidden, labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_a_frozen_linear_head_written_out_gives_the_full_logits_loss_and_gradient(chunk_rows: int, bias: bool) -> None:
    """The analytic path (softmax - one-hot, no autograd per chunk) against autograd on the full logits; .float()
    makes both compute in fp32, so they agree to fp32 rounding."""
    head = _frozen_linear(torch.float64, bias)
    hidden, labels = _hidden_and_labels(torch.float64)
    reference, ref_correct = _reference(hidden, head, labels)
    loss, correct = head_loss(hidden, head, labels, IGNORE, chunk_rows)
    assert correct == ref_correct
    torch.testing.assert_close(loss, reference.float(), rtol=1e-6, atol=0)
    (mine,), (ref,) = _grads(loss * 0.5, [hidden]), _grads(reference * 0.5, [hidden])
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "autocast"),
    [(torch.bfloat16, False), (torch.float32, True)],  # a bf16 model; fp32 weights under bf16 autocast
)
def test_a_frozen_linear_head_gives_bf16_logits_loss_and_gradient(dtype: torch.dtype, autocast: bool) -> None:
    """Both sides compute the same bf16 logits and sum their fp32 cross-entropy; hidden's gradient keeps its dtype."""
    head = _frozen_linear(dtype)
    hidden, labels = _hidden_and_labels(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference, ref_correct = _reference(hidden, head, labels)
        loss, correct = head_loss(hidden, head, labels, IGNORE, 8)
    assert correct == ref_correct and loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    (mine,), (ref,) = _grads(loss, [hidden]), _grads(reference, [hidden])
    assert mine.dtype == dtype
    torch.testing.assert_close(mine, ref, rtol=1e-2, atol=1e-2)


def test_the_compiled_chunk_loss_equals_the_eager_one() -> None:
    """What CUDA runs by default, compiled here on CPU: a chunk of 7 rows and the shorter last one (3 rows)."""
    head = _frozen_linear(torch.float32)
    hidden, labels = _hidden_and_labels(torch.float32)
    eager = head_loss(hidden, head, labels, IGNORE, 7, compiled=False)
    compiled = head_loss(hidden, head, labels, IGNORE, 7, compiled=True)
    assert compiled[1] == eager[1]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(_grads(compiled[0], [hidden])[0], _grads(eager[0], [hidden])[0], rtol=1e-5, atol=1e-7)


def test_a_compiler_that_fails_costs_speed_not_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the chunk loss compiles by default: a backend that cannot compile must not stop training."""
    from lorakit import head_loss as module

    def failing(*args: object) -> None:
        raise torch._dynamo.exc.TorchDynamoException("no working compiler")

    monkeypatch.setattr(module, "_compiled_loss_and_grad", lambda: failing)
    monkeypatch.setattr(module, "_compile_failed", False)
    head = _frozen_linear(torch.float32)
    hidden, labels = _hidden_and_labels(torch.float32)
    eager = head_loss(hidden, head, labels, IGNORE, 7, compiled=False)
    with pytest.warns(UserWarning, match="torch.compile failed on the head loss.*no working compiler"):
        fallen_back = head_loss(hidden, head, labels, IGNORE, 7, compiled=True)
    assert module._compile_failed and fallen_back[1] == eager[1]
    torch.testing.assert_close(fallen_back[0], eager[0], rtol=0, atol=0)


def test_a_head_with_a_hook_or_a_trainable_weight_goes_through_the_module() -> None:
    """The written-out path would skip a hook and give the weight no gradient: such heads use the module's forward."""
    head = _frozen_linear(torch.float64)
    hidden, labels = _hidden_and_labels(torch.float64)
    head.register_forward_hook(lambda module, args, out: out * 2.0)
    reference, _ = _reference(hidden, head, labels)
    torch.testing.assert_close(head_loss(hidden, head, labels, IGNORE, 7)[0], reference.float())
    trained = _frozen_linear(torch.float64).requires_grad_(True)
    loss, _ = head_loss(hidden, trained, labels, IGNORE, 7)
    torch.testing.assert_close(_grads(loss, [trained.weight])[0], _grads(_reference(hidden, trained, labels)[0],
                               [trained.weight])[0])  # fmt: skip


def test_without_gradients_nothing_is_recorded() -> None:
    head = nn.Linear(8, 30)
    with torch.no_grad():
        loss, _ = head_loss(torch.randn(10, 8), head, torch.randint(0, 30, (10,)), IGNORE, 3)
    assert loss.grad_fn is None


def _llama(tied: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(config)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # a padded row: its labels are ignored, as the collate writes them
    labels = ids.clone()
    labels[2, 15:] = IGNORE
    labels[0, :6] = IGNORE  # a prompt that is not learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    ("tied", "targets", "saved"),
    [
        (False, ["q_proj", "v_proj", "lm_head"], None),  # a LoRA on the head
        (True, ["q_proj", "v_proj"], None),  # the head is the embedding's weight
        (False, ["q_proj", "down_proj"], ["lm_head"]),  # the head trains in full
    ],
)
def test_the_split_model_scores_like_the_whole_one(tied: bool, targets: list[str], saved: list[str] | None) -> None:
    model = get_lora_model(_llama(tied), LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved))
    for p in model.parameters():  # nonzero B factors, so every factor gets a gradient
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    split = tasks._split(model)
    assert split is not None and split.chunk_rows == chunk_rows(96)
    split.chunk_rows = 7  # 49 scored tokens: 7 chunks
    batch = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    regular = tasks.score("causal-lm", model, batch)
    assert split.head is model.model.get_output_embeddings()  # the model's own head (a LoRA layer, when targeted)
    fused = tasks.score("causal-lm", model, batch, split)
    assert (fused.count, fused.correct) == (regular.count, regular.correct)
    torch.testing.assert_close(fused.loss_sum, regular.loss_sum, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(_grads(fused.mean_loss(), trainable), _grads(regular.mean_loss(), trainable), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_the_split_models_mean_loss_is_transformers_own_causal_lm_loss() -> None:
    """FusedHead's mean loss is the quantity model(..., labels=...).loss is (shifted labels, mean over scored
    tokens), with the same gradients: what the training-step benchmark compares across modes."""
    model = get_lora_model(_llama(tied=True), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    split = tasks._split(model)
    split.chunk_rows = 7
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    theirs = model(**batch).loss
    mine = split.score(batch).mean_loss()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=0)
    for g_mine, g_theirs in zip(_grads(mine, trainable), _grads(theirs, trainable), strict=True):
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-7)


class _ScaledLlama(nn.Module):
    """A causal LM that scales its logits after the head (as Cohere's logit_scale does): the split must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _llama(tied=False)
        self.base_model = self.inner.model

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head

    def forward(self, **inputs: torch.Tensor):
        out = self.inner(**inputs)
        out.logits = out.logits * 0.5
        return out


def _config(mode: str, task: str = "causal-lm", compile: str = "auto", distributed: str = "ddp") -> TrainConfig:
    return TrainConfig(task=task, model=ModelSection(source="x"), data=DataSection(path="x"),
                       run=RunSection(fused_head_loss=mode, compile=compile, distributed=distributed))  # fmt: skip


def _prepared() -> tasks.Prepared:
    batch = _batch()
    rows = [{k: v[0] for k, v in batch.items()}]
    return tasks.Prepared(rows, [], None, lambda examples: {k: torch.stack([e[k] for e in examples]) for k in rows[0]})


def _soft_capped_gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=0.1)  # fmt: skip
    return Gemma2ForCausalLM(config)


@pytest.mark.parametrize("build", [_ScaledLlama, _soft_capped_gemma2])
def test_a_model_that_changes_its_logits_after_the_head_keeps_the_regular_loss(build, capsys) -> None:
    model = get_lora_model(build(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert tasks._split(model) is not None
    assert tasks.fused_head(_config("auto"), model, _prepared(), world=1) is None
    assert "changes its logits after the output head" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="fused_head_loss = 'on'.*changes its logits"):
        tasks.fused_head(_config("on"), model, _prepared(), world=1)


def test_when_the_split_applies() -> None:
    model = get_lora_model(_llama(tied=True), LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    split = tasks.fused_head(_config("auto"), model, _prepared(), world=1)
    assert isinstance(split, tasks.FusedHead) and split.compiled is None  # compiled where blocks compile: CUDA
    assert model.training  # the check's eval mode is undone
    assert tasks.fused_head(_config("auto", compile="off"), model, _prepared(), world=1).compiled is False
    assert tasks.fused_head(_config("off"), model, _prepared(), world=1) is None
    # ddp calls the model itself on every rank; FSDP2 gathers the shards in hooks of the whole model's forward
    assert isinstance(tasks.fused_head(_config("auto"), model, _prepared(), world=2), tasks.FusedHead)
    assert tasks.fused_head(_config("auto", distributed="fsdp"), model, _prepared(), world=2) is None
    with pytest.raises(ConfigError, match="distributed = 'ddp' only, not 'fsdp'"):
        tasks.fused_head(_config("on", distributed="fsdp"), model, _prepared(), world=2)
    with pytest.raises(ConfigError, match="needs task 'causal-lm'"):
        _config("on", task="seq-cls")


def _lm_run(tmp_path: Path, mode: str) -> list[dict]:
    model = tmp_path / "gpt2"  # GPT-2 ties its head to the token embeddings
    if not model.exists():
        tiny_gpt2(model)
        (tmp_path / "lines.txt").write_text("the cat sat on the mat\nand a dog ran in the park today\n" * 12)
    config = causal_lm_config(tmp_path / f"{mode}.toml", model, tmp_path / "lines.txt", max_steps=6,
                              out_dir=f'"{tmp_path / mode}"', eval_every="3", fused_head_loss=f'"{mode}"')  # fmt: skip
    result = train(load_config(config))
    assert result.fused_head_loss == (mode == "on")
    return [json.loads(line) for line in (Path(result.folder) / "metrics.jsonl").read_text().splitlines()]


def test_a_training_run_has_the_same_losses_fused_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "chunk_rows", lambda vocab, device: 5)  # many chunks, not one
    fused, regular = _lm_run(tmp_path, "on"), _lm_run(tmp_path, "off")
    assert [(r["kind"], r["step"]) for r in fused] == [(r["kind"], r["step"]) for r in regular]
    for mine, ref in zip(fused, regular, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5), (mine, ref)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj"]])  # a LoRA head; a plain frozen one
def test_under_bf16_autocast_the_split_model_scores_like_the_whole_one(targets: list[str]) -> None:
    model = get_lora_model(_llama(tied=False), LoraConfig(r=4, target_modules=targets))
    split = tasks._split(model)
    split.chunk_rows = 16
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        nn.init.normal_(p, std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        regular = tasks.score("causal-lm", model, _batch())
        fused = tasks.score("causal-lm", model, _batch(), split)
    torch.testing.assert_close(fused.loss_sum, regular.loss_sum, rtol=2e-3, atol=0)
    for mine, ref in zip(_grads(fused.mean_loss(), trainable), _grads(regular.mean_loss(), trainable), strict=True):
        assert mine.dtype == ref.dtype == torch.float32  # fp32 factors keep fp32 gradients
        torch.testing.assert_close(mine, ref, rtol=2e-2, atol=2e-3)
