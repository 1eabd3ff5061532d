"""Pipelines built on another pipeline's very components: image-to-image and inpainting (flashsd.engine) and the
ControlNet pipelines (flashsd.control) share the loaded text-to-image pipeline's modules, so switching between them
loads, copies and casts nothing."""

from __future__ import annotations

import inspect


def derive(pipe, class_name: str, **extra):
    """A diffusers `class_name` pipeline on the very components of `pipe`, plus `extra` ones (a `controlnet`):
    diffusers' `from_pipe` without its final `.to(dtype)`, so the shared modules stay exactly as loaded."""
    import diffusers

    pipeline_class = getattr(diffusers, class_name)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    arguments = {name: module for name, module in pipe.components.items() if name in accepted} | extra
    # Pipeline-level settings (requires_safety_checker, force_zeros_for_empty_prompt, ...), as from_pipe does.
    arguments |= {
        key: value for key, value in pipe.config.items()
        if key in accepted and key not in arguments and not key.startswith("_")
    }  # fmt: skip
    derived = pipeline_class(**arguments)
    derived.set_progress_bar_config(disable=True)
    return derived


def shares_components(derived, pipe) -> bool:
    """Whether `derived` still runs every component of `pipe` it has (false once one of `pipe`'s was replaced)."""
    return all(
        getattr(derived, name, None) is module for name, module in pipe.components.items() if name in derived.components
    )
