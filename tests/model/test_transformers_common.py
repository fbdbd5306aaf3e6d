"""transformers' own `ModelTesterMixin` run against CSPForCausalLM, as transformers runs it on its own models.

The mixin is not part of the transformers wheel: it ships in the source distribution of the installed version, which
`.ci/run` downloads and extracts (`pip download transformers==$V --no-binary :all: --no-deps`) and names in
CSP_TRANSFORMERS_TESTS (the extracted folder, the one holding `tests/test_modeling_common.py`). Without it these tests
skip and say so. Two variants run: the shipped model's choices (attention sink, AbsTopK, bigram table, RMSNorm, untied
unembedding) and a plain GPT-2-like one.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import transformers
from safetensors.torch import save_file as safe_save_file
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from modeling_csp import CSPConfig, CSPForCausalLM, CSPModel
from modeling_csp.model.modeling_csp import CSPPreTrainedModel

SDIST_ENV = "CSP_TRANSFORMERS_TESTS"
PACKAGE = "transformers_sdist_tests"

# The tests of the mixin that may skip here, and why; any other skip fails (`skipTest` below), and the list is checked
# against the mixin (`test_the_allowed_skips_are_exactly_the_mixins_hardware_and_absent_feature_tests`).
# Hardware this CI does not have: an accelerator, several devices, flash-attention kernels (DeepSpeed's tests are
# multi-GPU training).
HARDWARE_SKIPS = {
    **dict.fromkeys([
        "test_can_load_with_device_context_manager", "test_can_load_with_global_device_set", "test_cpu_offload",
        "test_disk_offload_bin", "test_disk_offload_safetensors", "test_flex_attention_with_grads",
        "test_kernels_can_load_without_crashing", "test_kernels_can_run_without_crashing_inference",
        "test_kernels_can_run_without_crashing_training", "test_sdpa_can_compile_dynamic",
        "test_sdpa_can_dispatch_on_flash", "test_torch_compile_for_training",
    ], "needs an accelerator (require_torch_accelerator)"),
    "test_model_parallelism": "needs several accelerators",
    **dict.fromkeys([
        "test_resize_embeddings_untied_with_deepspeed", "test_resize_embeddings_untied_with_deepspeed_multi_gpu",
        "test_resize_tokens_embeddings_with_deepspeed", "test_resize_tokens_embeddings_with_deepspeed_multi_gpu",
    ], "needs DeepSpeed, multi-device training"),
    **{name: "needs flash-attention on a GPU" for name in [
        f"test_flash_attn_{v}_{t}" for v in (2, 3, 4) for t in (
            "can_dispatch_composite_models", "from_config", "inference_equivalence",
            "inference_equivalence_right_padding")] + [
        "test_flash_attn_2_can_compile_with_attention_mask_None_without_graph_break", "test_flash_attn_2_fp32_ln",
        "test_flash_attn_kernels_inference_equivalence", "test_flash_attn_kernels_mps_inference_equivalence"]},
}
# Features of other architectures that this model does not have: the mixin skips their tests for every such model.
ABSENT_FEATURE_SKIPS = {
    **dict.fromkeys(["test_attn_implementation_composite_models", "test_can_set_attention_dynamically_composite_model",
                     "test_sdpa_can_dispatch_composite_models", "test_internal_model_config_and_subconfig_are_same"],
                    "not a composite (multi-config) model"),
    **dict.fromkeys(["test_model_rope_scaling_frequencies", "test_model_rope_scaling_from_config",
                     "test_model_rope_with_partial_rotation", "test_vision_axial_rope"],
                    "no rotary position embedding (learned positions, as GPT-2)"),
    **dict.fromkeys(["test_moe_models_record_router_logits", "test_output_router_logits_from_config",
                     "test_eager_matches_batched_and_grouped_inference"], "no mixture of experts"),
    **dict.fromkeys(["test_keep_in_fp32_modules", "test_keep_in_fp32_modules_exist",
                     "test_keep_in_fp32_modules_strict_also_hardcode_fp32"], "no module that must stay in float32"),
    **dict.fromkeys(["test_can_capture_specific_layers_hidden_states", "test_capture_outputs_decorator"],
                    "outputs are not recorded with transformers' capture_outputs (the model has its own hook points)"),
    "test_encoder_decoder_loss_no_double_shift": "not an encoder-decoder",
    "test_sliding_window_mask": "no sliding-window attention",
    "test_tp_plan_matches_params": "no tensor-parallel plan (CPU-sized models)",
    "test_resize_position_vector_embeddings": "the context (block_size) is fixed by training: positions do not resize",
}
ALLOWED_SKIPS = HARDWARE_SKIPS | ABSENT_FEATURE_SKIPS


def allowed_skip(test_name: str) -> bool:
    """`test_x` or one of its parameterized cases `test_x_0_fp16`."""
    return any(test_name == name or test_name.startswith(name + "_") for name in ALLOWED_SKIPS)


def _sdist_tests_folder() -> Path | None:
    folder = os.environ.get(SDIST_ENV)
    if not folder:
        return None
    tests = Path(folder) / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        raise RuntimeError(f"{SDIST_ENV}={folder}: no tests/test_modeling_common.py there; point it at the extracted "
                           f"transformers-{transformers.__version__} source distribution")
    info = Path(folder) / "PKG-INFO"
    version = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("Version:")), None) if info.is_file() else None
    if version != transformers.__version__:
        raise RuntimeError(f"{SDIST_ENV}={folder} holds the tests of transformers {version}, but {transformers.__version__} "
                           "is installed: the common tests must come from the installed version's source distribution")
    return tests


def _load_model_tester_mixin(tests: Path):
    """`tests/test_modeling_common.py` of the source distribution, imported as a package of its own.

    It imports two mixins that the source distribution does not ship (`tests/exporters`, `tests/generation`); they
    stand in as empty classes: export is tested in test_compile.py, generation in test_generation.py.
    """
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests)]
        sys.modules[PACKAGE] = package
        for name, mixin in (("exporters.test_export", "ExportTesterMixin"), ("generation.test_utils", "GenerationTesterMixin")):
            parent = types.ModuleType(f"{PACKAGE}.{name.split('.')[0]}")
            parent.__path__ = []
            stub = types.ModuleType(f"{PACKAGE}.{name}")
            setattr(stub, mixin, type(mixin, (), {}))
            sys.modules[parent.__name__] = parent
            sys.modules[stub.__name__] = stub
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


TESTS_FOLDER = _sdist_tests_folder()
if TESTS_FOLDER is None:
    pytest.skip(f"set {SDIST_ENV} to the extracted transformers-{transformers.__version__} source distribution to run "
                "its ModelTesterMixin (.ci/run does)", allow_module_level=True)
if importlib.util.find_spec("parameterized") is None:
    pytest.skip("transformers' common tests need the `parameterized` package (in the [dev] extra)", allow_module_level=True)
common = _load_model_tester_mixin(TESTS_FOLDER)


@contextlib.contextmanager
def transformers_loader():
    """`from_pretrained` as transformers defines it, without our strict checks, while the block runs."""
    with patch.object(CSPPreTrainedModel, "from_pretrained", classmethod(PreTrainedModel.from_pretrained.__func__)):
        yield


class CSPModelTester:
    """A tiny CSPForCausalLM and its inputs, in the shape the mixin asks for (`model_tester` of a transformers test)."""

    def __init__(self, parent, **config_kwargs):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = 2, 7, True
        self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4
        self.config_kwargs = config_kwargs

    def get_config(self) -> CSPConfig:
        return CSPConfig(vocab_size=self.vocab_size, d_model=self.hidden_size, n_layer=self.num_hidden_layers,
                         n_head=self.num_attention_heads, d_mlp=37, block_size=64, pad_token_id=0,
                         **self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


SHIPPED_CHOICES = dict(sink=True, afrac=0.5, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out", enable_bigram_table=True,
                       learnable_bigram_table=True, rms_norm=True, tied_unembed=False, bias=False, ln_bias=False)


class ShippedChoicesCommonTest(common.ModelTesterMixin, common.GenerationTesterMixin, unittest.TestCase):
    """Sink, AbsTopK, bigram table, RMSNorm, untied: what the released models use.

    `GenerationTesterMixin` is the stand-in (the source distribution lacks it): test_generation.py covers generate.
    """

    all_model_classes = (CSPModel, CSPForCausalLM)
    config_kwargs = SHIPPED_CHOICES
    test_can_init_all_missing_weights_before_2023 = True  # the mixin dates models by a copyright line ours lacks

    @classmethod
    def setUpClass(cls):
        # transformers' own models sit in its auto mappings, which the mixin reads to pick tests and labels; ours
        # is registered the same way for the duration of the class.
        cls._registered = [patch.dict(mapping, {"csp": name}) for mapping, name in (
            (MODEL_MAPPING_NAMES, "CSPModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CSPForCausalLM"))]
        for registration in cls._registered:
            registration.start()

    @classmethod
    def tearDownClass(cls):
        for registration in cls._registered:
            registration.stop()

    def setUp(self):
        self.model_tester = CSPModelTester(self, **self.config_kwargs)

    # Our loader is strict where transformers' reports missing tensors and initialises them at random (README,
    # "Loading is strict"). The mixin's tests of that reporting run on transformers' own loader, and each also
    # checks that ours refuses the same checkpoint.
    def test_correct_missing_keys(self):
        with transformers_loader():
            super().test_correct_missing_keys()
        self.assert_strict_loader_refuses_a_base_model_checkpoint()

    def test_base_model_prefix_loads_base_weights(self):
        with transformers_loader():
            super().test_base_model_prefix_loads_base_weights()
        self.assert_strict_loader_refuses_a_base_model_checkpoint()

    def test_model_weights_reload_no_missing_tied_weights(self):
        with transformers_loader():
            super().test_model_weights_reload_no_missing_tied_weights()
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as folder:
            CSPForCausalLM(config).save_pretrained(folder)
            safe_save_file({"tensor": torch.tensor([1, 2])}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            with self.assertRaisesRegex(ValueError, "missing tensor"):
                CSPForCausalLM.from_pretrained(folder)

    def test_can_init_all_missing_weights(self):
        """`_init_weights` initialises every tensor (the mixin loads an empty state dict, which ours refuses)."""
        with transformers_loader():
            super().test_can_init_all_missing_weights()
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with self.assertRaisesRegex(ValueError, "missing keys"):
            CSPForCausalLM.from_pretrained(None, config=config, state_dict={})

    def assert_strict_loader_refuses_a_base_model_checkpoint(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as folder:
            CSPModel(config).save_pretrained(folder)
            with self.assertRaisesRegex(ValueError, r"missing tensor\(s\) .*lm_head.weight|missing tensor\(s\) .*final_logits_bias"):
                CSPForCausalLM.from_pretrained(folder)

    def skipTest(self, reason):
        """Only the listed skips are allowed: any other skip of the mixin is a failure that names the test."""
        name = self._testMethodName
        if not allowed_skip(name):
            raise AssertionError(f"{name} skipped ({reason}), which is not one of ALLOWED_SKIPS")
        super().skipTest(reason)


class PlainCommonTest(ShippedChoicesCommonTest):
    """LayerNorm with biases, tied unembedding, no sink, no AbsTopK, no bigram table."""

    config_kwargs = {}


def test_the_allowed_skips_are_exactly_the_mixins_hardware_and_absent_feature_tests():
    """Every listed skip is still a test of the mixin, and every test the mixin skips by decorator is listed."""
    tests = [name for name in dir(ShippedChoicesCommonTest) if name.startswith("test_")]
    for name in ALLOWED_SKIPS:
        assert any(test == name or test.startswith(name + "_") for test in tests), f"{name} is no longer a test of the mixin"
    decorated = [name for name in tests if getattr(getattr(ShippedChoicesCommonTest, name), "__unittest_skip__", False)]
    assert decorated and all(allowed_skip(name) for name in decorated), [n for n in decorated if not allowed_skip(n)]
    assert set(HARDWARE_SKIPS).isdisjoint(ABSENT_FEATURE_SKIPS)
