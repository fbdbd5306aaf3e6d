"""Where a model's inputs belong, also when accelerate has dispatched or offloaded it."""

import torch


def input_device(model) -> torch.device:
    """Where a model's inputs, masks and means belong: its parameters' device, or, when accelerate has offloaded
    them (parameters on `meta`), the device its dispatch hooks run the layers on."""
    device = model.device
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)  # accelerate's dispatch (device_map, offload)
    if device.type == "meta" and hook is not None:
        return torch.device(getattr(hook, "execution_device", None) or "cpu")
    return device
