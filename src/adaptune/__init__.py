"""adaptune: adapter tuning (Houlsby et al. 2019) for Hugging Face ``transformers`` models.

Add a small bottleneck adapter per task to a frozen pretrained model, train only it (plus layer
norms and head), and save it as a file of a few percent of the model's size.
"""

__version__ = "0.1.0"

from adaptune.core.architectures import ARCHITECTURES, ArchSpec, SlotSpec
from adaptune.core.bottleneck import Bottleneck
from adaptune.core.config import PRESETS, AdapterConfig
from adaptune.errors import AdapterFileError, AdaptuneError, ArchitectureError, ConfigError, DataError, TrainingError
from adaptune.cpu.heap import keep_freed_memory
from adaptune.core.inject import (
    active_adapter,
    add_adapter,
    add_fusion,
    list_adapters,
    remove_adapter,
    set_active,
    using_adapters,
)
from adaptune.cpu.kernels import use_lean_kernels
from adaptune.core.io import fingerprint, load_adapter, read_adapter_config, save_adapter
from adaptune.core.trainable import STRATEGIES, ParamCount, count_parameters, train_strategy
from adaptune.core.stack import Stack
from adaptune.core.average import average_adapters
from adaptune.interop.adapterhub import load_adapterhub
from adaptune.interop.adapterhub_export import save_adapterhub

# The CPU backend: importing it registers its kernels with adaptune.core.backend (the core never imports it).
from adaptune.cpu import adapter_gemm as _adapter_gemm  # noqa: F401
from adaptune.cpu import lean_gelu as _lean_gelu  # noqa: F401

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "STRATEGIES",
    "AdapterConfig",
    "AdapterFileError",
    "AdaptuneError",
    "ArchSpec",
    "ArchitectureError",
    "Bottleneck",
    "ConfigError",
    "DataError",
    "ParamCount",
    "SlotSpec",
    "Stack",
    "TrainingError",
    "active_adapter",
    "add_adapter",
    "add_fusion",
    "average_adapters",
    "count_parameters",
    "fingerprint",
    "keep_freed_memory",
    "list_adapters",
    "load_adapter",
    "load_adapterhub",
    "read_adapter_config",
    "remove_adapter",
    "save_adapter",
    "save_adapterhub",
    "set_active",
    "train_strategy",
    "use_lean_kernels",
    "using_adapters",
]
