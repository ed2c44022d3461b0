"""Parameter-efficient delta modules: LoRA and prefix tuning (through PEFT) and a bottleneck adapter.

    from mergekit_lab.delta import DeltaSettings, wrap_model, save_module, read_module, attach_module
    model = wrap_model(model, DeltaSettings(peft="lora", lora_r=8))     # frozen backbone + LoRA
    save_module(model, "pool/sst2", base_model="builtin:minilm", task="glue/sst2")
    model = attach_module(fresh_model, "pool/sst2")                     # eval mode, loads the head

Folders use PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) plus
``mklab_module.json``; see :mod:`mergekit_lab.delta.modules`.
"""

from mergekit_lab.delta.adapter import ADAPTER_PEFT_TYPE, AdapterConfig, AdapterLinear, inject_adapters
from mergekit_lab.delta.modules import (
    CONFIG_NAME,
    META_NAME,
    WEIGHTS_NAME,
    ModuleFolder,
    apply_folder_config,
    attach_module,
    delta_kind,
    delta_parameters,
    is_delta_model,
    is_head_key,
    is_module_folder,
    make_config,
    module_state_dict,
    read_module,
    save_module,
    wrap_model,
    write_meta,
)
from mergekit_lab.delta.settings import DeltaSettings

__all__ = [
    "ADAPTER_PEFT_TYPE",
    "AdapterConfig",
    "AdapterLinear",
    "CONFIG_NAME",
    "DeltaSettings",
    "META_NAME",
    "ModuleFolder",
    "WEIGHTS_NAME",
    "apply_folder_config",
    "attach_module",
    "delta_kind",
    "delta_parameters",
    "inject_adapters",
    "is_delta_model",
    "is_head_key",
    "is_module_folder",
    "make_config",
    "module_state_dict",
    "read_module",
    "save_module",
    "wrap_model",
    "write_meta",
]
