"""A LoraModel in the training clients PEFT users run (transformers.Trainer, accelerate), checked against the same
flow with PEFT's get_peft_model or against an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.errors import AdapterFileError
from tests.cases import tiny_bert_cls, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_BASES = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}
_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}


def _rows(n: int, arch: str) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 64, (n, 12), generator=torch.Generator().manual_seed(n))
    labels = [torch.tensor(i % 3) for i in range(n)] if arch == "bert" else list(ids)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]  # fmt: skip


def _model(kind: str, arch: str):
    """The same adapter (seeded, B not zero) through PEFT or lorakit."""
    fields = dict(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, target_modules=_TARGETS[arch],
                  task_type="SEQ_CLS" if arch == "bert" else "CAUSAL_LM")  # fmt: skip
    base = _BASES[arch]()
    torch.manual_seed(0)
    if kind == "peft":
        return peft.get_peft_model(base, peft.LoraConfig(**fields))
    return get_lora_model(base, LoraConfig(**fields))


def _trainer(model, arch: str, out: Path, **args):
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**(settings | args)),
        train_dataset=_rows(16, arch),
        eval_dataset=_rows(8, arch),
    )


def _losses(trainer) -> list[float]:
    return [record["loss"] for record in trainer.state.log_history if "loss" in record]


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def _run_both(arch: str, tmp_path: Path, **args) -> dict[str, tuple]:
    """Trains, evaluates and predicts with PEFT and with lorakit: {kind: (model, trainer, eval metrics, prediction)}."""
    runs = {}
    for kind in ("peft", "lorakit"):
        trainer = _trainer(_model(kind, arch), arch, tmp_path / kind, **args)
        trainer.train()
        runs[kind] = (trainer.model, trainer, trainer.evaluate(), trainer.predict(_rows(6, arch)))
    return runs


def _first(predictions):
    return predictions[0] if isinstance(predictions, tuple) else predictions


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_trainer_losses_evaluate_and_predict_match_peft(arch: str, tmp_path: Path) -> None:
    runs = _run_both(arch, tmp_path)
    (_, peft_trainer, peft_eval, peft_pred), (_, trainer, metrics, pred) = runs["peft"], runs["lorakit"]
    assert trainer.label_names == peft_trainer.label_names == ["labels"]
    torch.testing.assert_close(_losses(trainer), _losses(peft_trainer), rtol=0, atol=1e-5)
    assert metrics["eval_loss"] == pytest.approx(peft_eval["eval_loss"], abs=1e-5)
    assert pred.metrics["test_loss"] == pytest.approx(peft_pred.metrics["test_loss"], abs=1e-5)
    assert (pred.label_ids == peft_pred.label_ids).all()
    torch.testing.assert_close(
        torch.as_tensor(_first(pred.predictions)), torch.as_tensor(_first(peft_pred.predictions)), rtol=0, atol=1e-5
    )


def test_trainer_load_best_model_at_end_matches_peft(tmp_path: Path) -> None:
    """It ranks checkpoints by eval_loss, which a LoraModel's evaluate() must report; ranked highest first here, so
    the first checkpoint is the one loaded back at the end."""
    args = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)  # fmt: skip
    weights = {}
    for kind in ("peft", "lorakit"):
        trainer = _trainer(_model(kind, "llama"), "llama", tmp_path / kind, **args)
        trainer.train()
        weights[kind] = sorted(v.sum().item() for v in _trainable(trainer.model).values())
        assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert weights["lorakit"] == pytest.approx(weights["peft"], abs=1e-5)


def test_trainer_label_smoothing_shifts_causal_labels_as_peft(tmp_path: Path) -> None:
    """Trainer picks the causal-LM shift of its label smoother by the model's class name."""
    runs = _run_both("llama", tmp_path, label_smoothing_factor=0.1)
    torch.testing.assert_close(_losses(runs["lorakit"][1]), _losses(runs["peft"][1]), rtol=0, atol=1e-5)
    assert runs["lorakit"][2]["eval_loss"] == pytest.approx(runs["peft"][2]["eval_loss"], abs=1e-5)
    assert repr(runs["lorakit"][0]).startswith("LoraModel(\n  (model): LlamaForCausalLM(")


def test_trainer_checkpoints_of_a_tied_model_resume_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to wte: Trainer writes a LoraModel's checkpoint with safetensors, which refuses a tensor
    under two names."""
    args = dict(save_strategy="steps", save_steps=2)
    whole = _trainer(_model("lorakit", "gpt2"), "gpt2", tmp_path / "whole", **args)
    whole.train()
    model = _model("lorakit", "gpt2")
    resumed = _trainer(model, "gpt2", tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert _losses(resumed)[2:] == pytest.approx(_losses(whole)[2:], abs=1e-6)
    for name, value in _trainable(whole.model).items():
        torch.testing.assert_close(_trainable(model)[name], value, rtol=0, atol=0)
    state = model.state_dict()  # every name kept, so a strict load of it still fits
    assert "model.lm_head.weight" in state and "model.transformer.wte.weight" in state
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    _model("lorakit", "gpt2").load_state_dict(state)


def test_trainer_save_model_folder_is_refused_by_name_and_its_recipe_gives_a_peft_adapter(tmp_path: Path) -> None:
    """Trainer writes adapter folders only for PEFT's class; lorakit names what the folder is and the way out."""
    from safetensors.torch import load_file

    trainer = _trainer(_model("lorakit", "llama"), "llama", tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    with pytest.raises(AdapterFileError, match=r"model\.safetensors, a whole model's state dict.*save_pretrained"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    rebuilt = _model("lorakit", "llama")
    rebuilt.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"))
    rebuilt.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    batch = {"input_ids": torch.stack([row["input_ids"] for row in _rows(4, "llama")])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, rebuilt.eval()(**batch).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args", [dict(gradient_checkpointing=True), dict(bf16=True)], ids=["checkpointing", "bf16"])
def test_trainer_options_match_peft_and_the_adapter_loads_in_peft(args: dict, tmp_path: Path) -> None:
    runs = _run_both("llama", tmp_path, **args)
    torch.testing.assert_close(_losses(runs["lorakit"][1]), _losses(runs["peft"][1]), rtol=0, atol=1e-5)
    for kind in ("peft", "lorakit"):
        runs[kind][0].save_pretrained(tmp_path / kind / "adapter")
    _assert_peft_loads_both_alike(tiny_llama, tmp_path, _rows(4, "llama"))


def _assert_peft_loads_both_alike(base, tmp_path: Path, rows: list[dict[str, torch.Tensor]]) -> None:
    """PEFT's PeftModel.from_pretrained gives the same outputs from lorakit's adapter folder as from its own (both run
    outside the trainer, whose mixed-precision wrapping would make the trained model's outputs incomparable)."""
    batch = {"input_ids": torch.stack([row["input_ids"] for row in rows])}
    with torch.no_grad():
        peft_own, lorakit = (
            peft.PeftModel.from_pretrained(base(), tmp_path / kind / "adapter").eval()(**batch).logits
            for kind in ("peft", "lorakit")
        )
    torch.testing.assert_close(lorakit, peft_own, rtol=0, atol=1e-5)


def test_accelerate_prepare_train_save_and_state_round_trip_match_peft(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    ids = torch.stack([row["input_ids"] for row in _rows(4, "gpt2")])
    results = {}
    for kind in ("peft", "lorakit"):
        accelerator = accelerate.Accelerator(cpu=True)
        model = _model(kind, "gpt2")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        accelerator.unwrap_model(model).save_pretrained(tmp_path / kind / "adapter")
        accelerator.save_state(tmp_path / kind / "state")
        fresh = _model(kind, "gpt2")
        restored = accelerate.Accelerator(cpu=True)
        fresh, _ = restored.prepare(fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]))
        restored.load_state(tmp_path / kind / "state")
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
            torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, logits, rtol=0, atol=0)
        results[kind] = (losses, logits)
    torch.testing.assert_close(results["lorakit"][0], results["peft"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results["lorakit"][1], results["peft"][1], rtol=0, atol=1e-5)
    _assert_peft_loads_both_alike(tiny_gpt2, tmp_path, _rows(4, "gpt2"))


def test_adapter_checkpoints_hold_the_adapter_as_peft_s_checkpoints_do(tmp_path: Path) -> None:
    """With the callback, every checkpoint-N folder holds the adapter files beside Trainer's own; each loads in PEFT
    and in lorakit with the outputs PEFT's own checkpoint of the same run gives, and resuming still works."""
    from lorakit.hf_trainer import AdapterCheckpoints

    arch, ids = "llama", torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    outs = {}
    for kind in ("peft", "lorakit"):
        trainer = _trainer(_model(kind, arch), arch, tmp_path / kind, save_strategy="steps", save_steps=2)
        if kind == "lorakit":
            trainer.add_callback(AdapterCheckpoints())
        trainer.train()
        outs[kind] = [tmp_path / kind / f"checkpoint-{step}" for step in (2, 4)]
    for theirs, ours in zip(outs["peft"], outs["lorakit"], strict=True):
        assert (ours / "adapter_model.safetensors").is_file() and (ours / "trainer_state.json").is_file()
        want = peft.PeftModel.from_pretrained(tiny_llama(), theirs).eval()(input_ids=ids).logits
        for loaded in (
            peft.PeftModel.from_pretrained(tiny_llama(), ours),
            LoraModel.from_pretrained(tiny_llama(), ours),
        ):
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    resumed = _trainer(_model("lorakit", arch), arch, tmp_path / "lorakit", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(outs["lorakit"][0]))
    final = LoraModel.from_pretrained(tiny_llama(), outs["lorakit"][1]).eval()(input_ids=ids).logits
    torch.testing.assert_close(resumed.model.eval()(input_ids=ids).logits, final, atol=1e-6, rtol=0)


def test_adapter_checkpoints_refuse_a_model_that_is_not_a_lora_model(tmp_path: Path) -> None:
    from lorakit.errors import LorakitError
    from lorakit.hf_trainer import AdapterCheckpoints

    trainer = _trainer(_model("peft", "llama"), "llama", tmp_path, save_strategy="steps", save_steps=2)
    trainer.add_callback(AdapterCheckpoints())
    with pytest.raises(LorakitError, match="PeftModel.*get_lora_model"):
        trainer.train()


def test_a_quantized_base_with_lorakit_adapters_passes_transformers_training_check() -> None:
    """transformers refuses to train a quantized base without adapters; with PEFT's or lorakit's it trains."""
    from transformers.trainer_utils import validate_quantization_for_training

    class Quantizer:
        is_trainable = True

    base = tiny_llama()
    base.is_quantized, base.hf_quantizer = True, Quantizer()
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    validate_quantization_for_training(get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj"])))
