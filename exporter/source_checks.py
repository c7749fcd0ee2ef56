"""Checks of a model source's config against its own weights, before and after transformers loads it.

transformers builds the model the config describes, then fills it from the checkpoint;
whatever the checkpoint lacks it initializes at random and only logs so. A config that
does not match its weights (a hand-edited ``config.json``, a GGUF file with a damaged
``block_count``) would so export random layers, or, with an absurd layer count, spend
minutes and gigabytes building them. Both are refused here, as one ``SourceError``.
"""

from __future__ import annotations

import re
from pathlib import Path

from interp.errors import SourceError

#: the layer index in a checkpoint tensor's name: model.layers.3.mlp..., transformer.h.3..., blk.3...
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|blk)\.(\d+)\.")


def checkpoint_tensor_names(location: str, gguf_file: str | None) -> list[str]:
    """Names of the tensors of a local checkpoint (its safetensors headers, or the GGUF file's
    tensor infos); empty for a source that is not on disk (a hub id)."""
    folder = Path(location)
    if gguf_file:
        import gguf

        return [tensor.name for tensor in gguf.GGUFReader(folder / gguf_file).tensors]
    if not folder.is_dir():
        return []
    from exporter.pread import SafetensorsFile

    return [name for path in sorted(folder.glob("*.safetensors")) for name in SafetensorsFile(path).keys()]


def stored_layers(names: list[str]) -> int | None:
    """How many layers a checkpoint's tensor names hold (the largest layer index + 1), or None
    when no name carries one."""
    indices = [int(found.group(1)) for name in names if (found := _LAYER_INDEX.search(name))]
    return max(indices) + 1 if indices else None


def check_config(config, names: list[str], location: str) -> None:
    """SourceError when the config declares more layers than the checkpoint holds weights for
    (before the model, all of its layers, is built), or names its architectures other than as a
    list of class names (the program records the first)."""
    architectures = getattr(config, "architectures", None)
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(name, str) for name in architectures)):
        raise SourceError(f"{location}: the config's architectures must be a list of class names, "
                          f"not {architectures!r:.60}")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(text_config, "num_hidden_layers", None)
    stored = stored_layers(names)
    if isinstance(declared, int) and stored is not None and declared > stored:
        raise SourceError(f"{location}: the config declares {declared} layers but the checkpoint holds weights "
                          f"for {stored}: does the config belong to these weights?")


def require_weights(missing: set[str], location: str, what: str = "the model's") -> None:
    """SourceError naming the parameters the checkpoint had no weights for (transformers would
    have initialized them at random)."""
    if missing:
        names = ", ".join(sorted(missing)[:3])
        raise SourceError(f"{location}: the checkpoint has no weights for {what} {names}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
