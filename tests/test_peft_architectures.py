"""lorakit against PEFT across transformers architectures: default and all-linear targets, outputs, files both ways,
merging. Each model is built from a tiny config with seeded weights, so nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraModel, TargetError, get_lora_model
from lorakit.io import adapter_tensors

ATOL = 1e-5
VOCAB = 64
LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
}
BERT_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 40,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
BART_LIKE = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "max_position_embeddings": 32,
    "decoder_start_token_id": 2,
}


@dataclass
class Arch:
    name: str
    model_class: str  # a transformers class name; the architecture is skipped where transformers lacks it
    config_class: str
    config: dict[str, Any]
    inputs: str = "ids"  # ids | seq2seq | pixels | audio
    lora: dict[str, Any] = field(default_factory=dict)  # extra LoraConfig fields (task_type)

    def __str__(self) -> str:
        return self.name

    def build(self) -> nn.Module:
        model_class = getattr(transformers, self.model_class, None)
        if model_class is None:
            pytest.skip(f"transformers {transformers.__version__} has no {self.model_class}")
        torch.manual_seed(0)
        return model_class(getattr(transformers, self.config_class)(**self.config)).eval()

    def batch(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
        if self.inputs == "pixels":
            return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)}
        if self.inputs == "audio":
            return {"input_features": torch.randn(2, 8, 32, generator=gen), "decoder_input_ids": ids[:, :5]}
        if self.inputs == "seq2seq":
            return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
        return {"input_ids": ids}


ARCHS = [
    Arch("mistral", "MistralForCausalLM", "MistralConfig", LLAMA_LIKE),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", LLAMA_LIKE),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}),
    Arch("phi", "PhiForCausalLM", "PhiConfig", {**LLAMA_LIKE, "num_key_value_heads": 4}),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", LLAMA_LIKE),
    Arch("gemma", "GemmaForCausalLM", "GemmaConfig", {**LLAMA_LIKE, "head_dim": 8}),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config", {**LLAMA_LIKE, "head_dim": 8}),
    Arch("stablelm", "StableLmForCausalLM", "StableLmConfig", LLAMA_LIKE),
    Arch(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        {**LLAMA_LIKE, "num_local_experts": 2, "num_experts_per_tok": 2},
    ),
    Arch(
        "qwen3_moe",  # PEFT's other fused-experts family: gate_proj / up_proj fused into gate_up_proj
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        {**LLAMA_LIKE, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 2, "num_experts_per_tok": 2},
    ),
    Arch(
        "gpt_oss",  # its experts store each weight (in x out): is_transposed
        "GptOssForCausalLM",
        "GptOssConfig",
        {**LLAMA_LIKE, "head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 2},
    ),
    Arch(
        "falcon",
        "FalconForCausalLM",
        "FalconConfig",
        {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
    ),
    Arch(
        "bloom", "BloomForCausalLM", "BloomConfig", {"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 1, "n_head": 4}
    ),
    Arch(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "ffn_dim": 48,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "word_embed_proj_dim": 32,
        },
    ),
    Arch(
        "gpt_neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {**LLAMA_LIKE, "num_key_value_heads": 4},
    ),
    Arch(
        "gptj",
        "GPTJForCausalLM",
        "GPTJConfig",
        {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 32, "rotary_dim": 4},
    ),
    Arch(
        "codegen",
        "CodeGenForCausalLM",
        "CodeGenConfig",
        {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 32, "n_ctx": 32, "rotary_dim": 4},
    ),
    Arch(
        "t5",
        "T5ForConditionalGeneration",
        "T5Config",
        {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 1, "num_heads": 4},
        inputs="seq2seq",
    ),
    Arch("bart", "BartForConditionalGeneration", "BartConfig", BART_LIKE, inputs="seq2seq"),
    Arch(
        "roberta-cls",
        "RobertaForSequenceClassification",
        "RobertaConfig",
        {**BERT_LIKE, "pad_token_id": 1, "num_labels": 3},
        lora={"task_type": "SEQ_CLS"},
    ),
    Arch(
        "distilbert",
        "DistilBertForMaskedLM",
        "DistilBertConfig",
        {"vocab_size": VOCAB, "dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 48, "max_position_embeddings": 32},
    ),
    Arch("deberta-v2", "DebertaV2ForMaskedLM", "DebertaV2Config", BERT_LIKE),
    Arch("electra", "ElectraForMaskedLM", "ElectraConfig", {**BERT_LIKE, "embedding_size": 16}),
    Arch(
        "vit",
        "ViTForImageClassification",
        "ViTConfig",
        {**BERT_LIKE, "image_size": 8, "patch_size": 4, "num_channels": 3, "num_labels": 3},
        inputs="pixels",
    ),
    Arch(
        "clip-text",
        "CLIPTextModel",
        "CLIPTextConfig",
        {k: v for k, v in BERT_LIKE.items() if "dropout" not in k},
    ),
    Arch(
        "whisper",
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        {
            **BART_LIKE,
            **{"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16},
            **{"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        },
        inputs="audio",
    ),
]


# PEFT 0.21 refuses its own default target_modules (q_proj, v_proj) for Mixtral on transformers 5: its MoE config
# conversion (_convert_peft_config_moe in peft/utils/transformers_weight_conversion.py, the `set(value or [])` of
# huggingface/peft#3229) runs before the default table is read and turns target_modules=None into an empty set, which
# then matches nothing (NoMatchingPeftModuleError). lorakit adapts what PEFT's table names.
PEFT_REFUSES_ITS_DEFAULT = {"mixtral"}


def _output(result: Any) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _run(model: nn.Module, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**arch.batch()))


def _peft_keys(arch: Arch, **config) -> set[str]:
    theirs = peft.get_peft_model(arch.build(), peft.LoraConfig(**arch.lora, **config))
    return set(peft.get_peft_model_state_dict(theirs))


def _our_keys(arch: Arch, **config) -> set[str]:
    ours = get_lora_model(arch.build(), LoraConfig(**arch.lora, **config))
    return set(adapter_tensors(ours.model, "default", ours.peft_config["default"]))


def _has_peft_default(arch: Arch) -> bool:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return arch.build().config.model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_default_targets_are_peft_defaults(arch: Arch):
    if arch.name in PEFT_REFUSES_ITS_DEFAULT:
        with pytest.raises(ValueError, match="target_modules"):
            _peft_keys(arch)
        adapted = {key.split(".lora_")[0] for key in _our_keys(arch)}
        assert adapted == {"base_model.model.model.layers.0.self_attn." + name for name in ("q_proj", "v_proj")}
        return
    if not _has_peft_default(arch):
        with pytest.raises(ValueError, match="target_modules"):
            _peft_keys(arch)
        with pytest.raises(TargetError, match="no default target_modules"):
            _our_keys(arch)
        return
    expected = _peft_keys(arch)
    assert expected
    assert _our_keys(arch) == expected


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_all_linear_adapts_what_peft_adapts(arch: Arch):
    assert _our_keys(arch, target_modules="all-linear") == _peft_keys(arch, target_modules="all-linear")


def test_all_linear_on_fused_experts_is_peft_s_conversion():
    """Mixtral's experts are two 3-D parameters of one module and its router no nn.Linear: all-linear becomes
    target_parameters on both expert weights (gate_up_proj, fused from w1 and w3, at twice the rank and alpha) and
    the router, recorded in the config as PEFT records it."""
    arch = next(a for a in ARCHS if a.name == "mixtral")
    ours = get_lora_model(arch.build(), LoraConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(arch.build(), peft.LoraConfig(target_modules="all-linear"))
    expected = theirs.peft_config["default"]
    config = ours.peft_config["default"]
    assert set(config.target_modules) == expected.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config.target_parameters) == expected.target_parameters == {"gate_up_proj", "down_proj", "gate.weight"}
    assert config.rank_pattern == expected.rank_pattern and config.alpha_pattern == expected.alpha_pattern
    ranks = {key: tuple(t.shape) for key, t in adapter_tensors(ours.model, "default", config).items()}
    assert ranks == {key: tuple(t.shape) for key, t in peft.get_peft_model_state_dict(theirs).items()}


def test_transformers_4_expert_names_are_peft_s_conversion():
    """Mixtral's transformers 4 layer names (w1, w3, w2, gate) adapt the fused weights that replaced them, as in
    PEFT; naming one of two fused layers is refused by both."""
    arch = next(a for a in ARCHS if a.name == "mixtral")
    names = ["q_proj", "w1", "w2", "w3", "gate"]
    assert _our_keys(arch, target_modules=names, r=4) == _peft_keys(arch, target_modules=names, r=4)
    with pytest.raises(ValueError, match="without also targeting w3"):
        _peft_keys(arch, target_modules=["q_proj", "w1"])
    with pytest.raises(TargetError, match=r"names \['w1'\] but not \['w3'\].*name all of them or none"):
        _our_keys(arch, target_modules=["q_proj", "w1"])


def _random_adapter(arch: Arch) -> LoraModel:
    torch.manual_seed(2)
    return get_lora_model(arch.build(), LoraConfig(target_modules="all-linear", init_lora_weights=False, **arch.lora))


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_our_files_give_peft_our_outputs_and_merge_to_them(arch: Arch, tmp_path):
    ours = _random_adapter(arch).eval()
    expected = _run(ours, arch)
    assert not torch.allclose(expected, _run(arch.build(), arch), atol=1e-4), "the adapter must change the output"
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(arch.build(), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(_run(theirs, arch), expected, atol=ATOL, rtol=0)
    ours.train()
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]  # totals: see model.py
    merged = ours.eval().merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_run(merged, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_peft_files_give_us_peft_outputs(arch: Arch, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, **arch.lora)
    theirs = peft.get_peft_model(arch.build(), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(arch.build(), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(_run(ours, arch), _run(theirs, arch), atol=ATOL, rtol=0)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]  # totals: see model.py


@pytest.mark.parametrize(
    ("name", "parameter"),
    [("mixtral", "experts.gate_up_proj"), ("mixtral", "experts.down_proj"), ("gpt_oss", "experts.gate_up_proj")],
)
def test_expert_stacks_match_peft(name: str, parameter: str, tmp_path):
    """A 3-D expert stack and the router's weight through target_parameters: same outputs as PEFT both ways, and
    merging keeps them."""
    arch = next(a for a in ARCHS if a.name == name)
    router = "gate.weight" if name == "mixtral" else "router.weight"
    config = {"target_modules": ["q_proj"], "target_parameters": [parameter, router], "init_lora_weights": False}
    torch.manual_seed(2)
    ours = get_lora_model(arch.build(), LoraConfig(**config)).eval()
    expected = _run(ours, arch)
    assert not torch.allclose(expected, _run(arch.build(), arch), atol=1e-4), "the adapter must change the output"
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(arch.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(theirs, arch), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_run(ours.merge_and_unload(), arch), expected, atol=ATOL, rtol=0)

    torch.manual_seed(3)
    theirs = peft.get_peft_model(arch.build(), peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(arch.build(), tmp_path / "theirs").eval()
    torch.testing.assert_close(_run(back, arch), _run(theirs, arch), atol=ATOL, rtol=0)


def _both_ways(build, run, config: dict, tmp_path) -> tuple[LoraModel, nn.Module]:
    """Random adapters from each library, each saved and loaded by the other on a fresh base: same outputs, same
    file keys. Returns (ours, theirs), both loaded from the other side's folder."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours_back = LoraModel.from_pretrained(build(), tmp_path / "theirs").eval()
    torch.testing.assert_close(run(ours_back), run(theirs), atol=ATOL, rtol=0)
    torch.manual_seed(3)
    ours = get_lora_model(build(), LoraConfig(init_lora_weights=False, **config)).eval()
    assert not torch.allclose(run(ours), run(build()), atol=1e-4), "the adapter must change the output"
    ours.save_pretrained(tmp_path / "ours")
    theirs_back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs_back), run(ours), atol=ATOL, rtol=0)
    from safetensors.torch import load_file

    keys = [set(load_file(tmp_path / side / "adapter_model.safetensors")) for side in ("ours", "theirs")]
    assert keys[0] == keys[1]
    return ours_back, theirs_back


def _gemma3() -> nn.Module:
    config = {**LLAMA_LIKE, "head_dim": 8, "tie_word_embeddings": False}
    return Arch("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", config).build()


def _bart_scaled() -> nn.Module:
    return Arch("bart", "BartForConditionalGeneration", "BartConfig", {**BART_LIKE, "scale_embedding": True}).build()


@pytest.mark.parametrize(
    ("build", "batch", "config"),
    [
        (_gemma3, "ids", {"target_modules": ["embed_tokens", "q_proj"]}),
        (_gemma3, "ids", {"target_modules": ["embed_tokens"], "use_dora": True}),
        (_gemma3, "ids", {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5]}),
        (_bart_scaled, "seq2seq", {"target_modules": ["decoder.embed_tokens"]}),  # one of the tables tied to shared
    ],
    ids=["gemma3-lora", "gemma3-dora", "gemma3-trainable-tokens", "bart-scale_embedding"],
)
def test_a_scaled_word_embedding_scales_the_adapter_term_as_peft_does(build, batch, config, tmp_path):
    """Gemma 3's and BART's (scale_embedding) embeddings return table[ids] * embed_scale: PEFT scales the LoRA and
    DoRA terms alike (trainable tokens change the table itself), so each side's file gives the other side's outputs,
    both save the adapted table's base weight (save_embedding_layers="auto"), and merging changes nothing."""
    assert float(build().get_input_embeddings().embed_scale) != 1.0
    arch = Arch("scaled", "", "", {}, inputs=batch)

    def run(model):
        return _run(model, arch)

    ours, _ = _both_ways(build, run, config, tmp_path)
    expected = run(ours)
    torch.testing.assert_close(run(ours.merge_and_unload()), expected, atol=ATOL, rtol=0)


def _mobilebert() -> nn.Module:
    config = {
        **BERT_LIKE,
        **{"embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16, "num_feedforward_networks": 1},
    }
    return Arch("mobilebert", "MobileBertForMaskedLM", "MobileBertConfig", config).build()


def test_a_head_that_reads_its_saved_decoder_s_tensors_gets_the_trained_copy_s(tmp_path):
    """MobileBERT's LM head reads decoder.weight and decoder.bias without calling decoder: with modules_to_save=
    ["decoder"] they are the trained copy's (PEFT's ModulesToSaveWrapper forwards attribute reads), both ways."""
    arch = Arch("mobilebert", "", "", {})
    config = {"target_modules": ["query", "value"], "modules_to_save": ["decoder"], "r": 4}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_mobilebert(), peft.LoraConfig(**config)).eval()
    ours = get_lora_model(_mobilebert(), LoraConfig(**config)).eval()
    _trained_alike = [p for p in (*theirs.parameters(), *ours.parameters()) if p.requires_grad]
    with torch.no_grad():
        for p in _trained_alike:
            p.normal_(std=0.1)
    for model, side in ((theirs, "theirs"), (ours, "ours")):
        model.save_pretrained(tmp_path / side)
    back = LoraModel.from_pretrained(_mobilebert(), tmp_path / "theirs").eval()
    torch.testing.assert_close(_run(back, arch), _run(theirs, arch), atol=ATOL, rtol=0)
    peft_back = peft.PeftModel.from_pretrained(_mobilebert(), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(peft_back, arch), _run(ours, arch), atol=ATOL, rtol=0)
    with ours.disable_adapter():  # attribute reads fall back to the original, as the forward does
        torch.testing.assert_close(_run(ours, arch), _run(_mobilebert(), arch), atol=ATOL, rtol=0)


def _wav2vec2() -> nn.Module:
    config = {
        **{k: v for k, v in BERT_LIKE.items() if "dropout" not in k},
        **{"conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16},
        **{"num_conv_pos_embedding_groups": 4, "hidden_dropout": 0.0, "layerdrop": 0.0, "mask_time_prob": 0.0},
    }
    return Arch("wav2vec2", "Wav2Vec2ForCTC", "Wav2Vec2Config", config).build()


def test_a_weight_normed_grouped_conv_is_adapted_on_its_output_as_peft_does(tmp_path):
    """Wav2Vec2's positional conv is a grouped Conv1d under torch's weight_norm (two stored tensors, g and v): its
    LoRA acts on the output and matches PEFT both ways; merging is refused by name, as a grouped conv cannot hold
    dW."""
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))

    def run(model):
        with torch.no_grad():
            return model(audio).logits

    config = {"target_modules": ["pos_conv_embed.conv", "q_proj"], "r": 4}
    ours, _ = _both_ways(_wav2vec2, run, config, tmp_path)
    with pytest.raises(LorakitError, match="groups=4 cannot merge"):
        ours.merge_adapter()


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["out_proj"]},
        {"target_modules": ["conv1d"], "r": 64},
        {"target_modules": "all-linear"},
        {"target_modules": ["x_proj"], "target_parameters": ["out_proj.weight"]},
    ],
    ids=["out_proj", "conv1d", "all-linear", "target_parameters"],
)
def test_mamba_s_fused_kernel_weights_are_refused_as_in_peft(config, tmp_path):
    """Mamba's CUDA kernels read out_proj's and conv1d's weights directly, so PEFT refuses LoRA on them; so does
    lorakit, naming the modules and the fix, which both then accept (files load both ways)."""
    mamba = {"vocab_size": VOCAB, "hidden_size": 32, "state_size": 4, "num_hidden_layers": 1, "expand": 2}
    arch = Arch("mamba", "MambaForCausalLM", "MambaConfig", {**mamba, "conv_kernel": 3, "time_step_rank": 4})
    with pytest.raises(ValueError, match="incompatible with Mamba-based models"):
        peft.get_peft_model(arch.build(), peft.LoraConfig(**config))
    with pytest.raises(
        TargetError, match=r"LoRA cannot go on \['(out_proj|conv1d)'\] of a mamba model.*exclude_modules"
    ):
        get_lora_model(arch.build(), LoraConfig(**config))
    fixed = {"target_modules": "all-linear", "exclude_modules": ["out_proj"]}
    _both_ways(arch.build, lambda model: _run(model, arch), fixed, tmp_path)
