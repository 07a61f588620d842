"""``consa export``: write a hybrid checkpoint, and ``load_hybrid`` to read it back.

An export directory is an ordinary transformers checkpoint (safetensors weights, tokenizer, ``config.json``)
plus ``consa_mask.safetensors`` holding the allocation. ``config.json`` carries a ``consa`` section that says
how to load it:

* ``loader: transformers`` -- a layer allocation without sinks in a family with a native hybrid config
  (Qwen3/Qwen2 ``layer_types``; Llama relabelled as SmolLM3; Mistral as Ministral). Plain
  ``AutoModelForCausalLM.from_pretrained`` runs it as the hybrid, no consa import needed.
* ``loader: consa`` -- everything else (KV-head allocations, sinks): ``consa_cli.load_hybrid(path)``. The KV
  heads are stored reordered, full-attention heads first in every layer (``kv_head_order`` in the section), and
  the directory carries ``modeling_consa.py`` so plain transformers with remote code enabled runs it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from consa_cli import hybrid_runtime
from consa_cli.allocation import Allocation, AllocationError
from consa_cli.attention import hybrid_attention
from consa_cli.families import adapter_for
from consa_cli.hybrid_runtime import cache_argument, hybrid_cache, install_prefix_hybrid
from consa_cli.inference import hybrid_inference, install_inference, kv_head_order, permute_kv_heads
from consa_cli.models import load_model_and_tokenizer, model_fingerprint

MASK_FILE = "consa_mask.safetensors"
LOADER_TRANSFORMERS = "transformers"
LOADER_CONSA = "consa"
REMOTE_MODULE = "modeling_consa"
REMOTE_CLASS = "ConsaHybridForCausalLM"


class ExportError(ValueError):
    """The export cannot be written or read back."""


@dataclass
class ExportResult:
    path: Path
    loader: str
    allocation: Allocation
    max_logit_difference: float | None  # native export vs consa runtime, when verified


def native_config(config: dict, allocation: Allocation) -> dict | None:
    """The plain-transformers config for ``allocation``, or None when only consa's runtime can run it."""
    if allocation.sink_tokens != 0 or not all(bool((row == row[0]).all()) for row in allocation.fa_mask):
        return None
    export = adapter_for(config["model_type"]).native_layer_export
    return export(config, allocation.layer_is_full, allocation.sliding_window) if export else None


def export_checkpoint(
    allocation_path: str | Path,
    output: str | Path,
    model_name: str | None = None,
    force: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Write the model named by the allocation (or ``model_name``) with the allocation into ``output``.

    The directory is written under a temporary name and renamed at the end, so an interrupted export never
    leaves a half-written checkpoint. An existing ``output`` is only replaced with ``force``.
    """
    output = Path(output)
    allocation = Allocation.load(allocation_path)
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    name = model_name or allocation.model or None
    model, tokenizer = load_model_and_tokenizer(name, dtype=None)
    allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads,
                          model_fingerprint(model))
    return write_checkpoint(model, tokenizer, allocation, output, verify=verify)


def write_checkpoint(model, tokenizer, allocation: Allocation, output: str | Path, verify: bool = True,
                     extra_section: dict | None = None,
                     after_write: Callable[[Path], None] | None = None) -> ExportResult:
    """Write ``model`` (its weights as they are, ``allocation`` fitted to them) as an export directory at ``output``,
    replacing one that exists; ``extra_section`` is added to config.json's ``consa`` section (``consa heal`` records
    its settings there) and ``after_write(directory)`` may add files before the directory is moved into place. The KV
    heads of a consa-loaded export are permuted in ``model`` itself."""
    output = Path(output)
    original_config = model.config.to_dict()
    patched = native_config(original_config, allocation)
    loader = LOADER_TRANSFORMERS if patched is not None else LOADER_CONSA
    config_dict = patched if patched is not None else dict(original_config)
    config_dict["consa"] = {
        "loader": loader,
        "load_with": "transformers.AutoModelForCausalLM.from_pretrained"
        if loader == LOADER_TRANSFORMERS else "consa_cli.load_hybrid",
        "mask_file": MASK_FILE,
        "source_model": allocation.model,
        "allocation": allocation.settings_dict(),
        **(extra_section or {}),
    }

    difference = None
    if loader == LOADER_CONSA:
        # FA heads first in every layer, so the runtime attends on contiguous head slices; the written
        # modeling file runs the export in plain transformers (remote code) without consa.
        order = kv_head_order(allocation.fa_mask)
        difference = _verify_permuted(model, allocation) if verify else None
        permute_kv_heads(model, order)
        config_dict["consa"].update(kv_head_order=order.tolist(),
                                    full_heads_per_layer=allocation.fa_mask.sum(dim=1).tolist())
        config_dict["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        allocation.save(staging / MASK_FILE)
        if loader == LOADER_CONSA:
            (staging / f"{REMOTE_MODULE}.py").write_text(remote_modeling_source(type(model).__name__))
        elif verify:
            difference = _verify_native(staging, model, allocation)
        if after_write is not None:
            after_write(staging)
        _replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output, loader, allocation, difference)


def _verify_native(path: Path, model, allocation: Allocation) -> float:
    """Max |logit| difference between plain transformers on the export and consa's runtime on the source."""
    length = min(2 * allocation.sliding_window + 16, getattr(model.config, "max_position_embeddings", 4096))
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    native = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).eval()
    with torch.no_grad():
        native_logits = native(tokens).logits.float()
        with hybrid_attention(model, allocation.fa_mask, allocation.sliding_window, allocation.sink_tokens):
            consa_logits = model(tokens).logits.float()
    difference = (native_logits - consa_logits).abs().max().item()
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2 * consa_logits.abs().max().item()
    if difference > tolerance:
        raise ExportError(f"native export does not reproduce consa's runtime (max logit difference {difference:.3g})")
    return difference


def _verify_permuted(model, allocation: Allocation) -> float:
    """Max |logit| difference between the FA-first permuted model on consa's inference runtime (prefill, then
    decoding on the hybrid cache) and consa's search-time attention on the original weights."""
    length = min(2 * allocation.sliding_window + 16, getattr(model.config, "max_position_embeddings", 4096))
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    prefill = length - 4
    with torch.no_grad():
        with hybrid_attention(model, allocation.fa_mask, allocation.sliding_window, allocation.sink_tokens):
            reference = model(tokens).logits.float()
        with hybrid_inference(model, allocation):
            cache = {cache_argument(model): hybrid_cache(model)}
            steps = [model(tokens[:, :prefill], **cache).logits]
            steps += [model(tokens[:, i : i + 1], **cache).logits for i in range(prefill, length)]
    difference = (torch.cat(steps, dim=1).float() - reference).abs().max().item()
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2 * reference.abs().max().item()
    if difference > tolerance:
        raise ExportError(f"the KV-head permuted export does not reproduce consa's runtime (max logit difference "
                          f"{difference:.3g})")
    return difference


def remote_modeling_source(architecture: str) -> str:
    """Text of the ``modeling_consa.py`` an export carries: consa's self-contained runtime plus a model class
    that runs it, so the checkpoint loads in plain transformers with remote code enabled and no consa."""
    runtime = Path(hybrid_runtime.__file__).read_text()
    return runtime + f"""

# --- written by consa export: the model class transformers loads (auto_map in config.json) ---

from transformers import {architecture} as _ConsaBase  # noqa: E402


class {REMOTE_CLASS}(_ConsaBase):
    \"\"\"{architecture} whose KV heads are ordered full-attention first, running the hybrid attention and
    cache above. Settings come from the ``consa`` section of config.json.\"\"\"

    def __init__(self, config):
        super().__init__(config)
        settings = config.consa
        install_prefix_hybrid(self, settings["full_heads_per_layer"], settings["allocation"]["sliding_window"],
                              settings["allocation"]["sink_tokens"])
"""


def _replace_directory(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``; an old ``output`` is removed only once the new one is in place."""
    backup = None
    if output.exists():
        backup = output.with_name(f".{output.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(output, backup)
    os.replace(staging, output)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def read_export_config(path: str | Path) -> dict:
    """The ``consa`` section of an export's config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        section = json.loads(config_file.read_text()).get("consa")
    except json.JSONDecodeError as error:
        raise ExportError(f"{config_file} is not valid JSON ({error})") from None
    if not section:
        raise ExportError(f"{path} is not a consa export (config.json has no 'consa' section)")
    return section


def load_hybrid(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                return_tokenizer: bool = False):
    """Load a ``consa export`` directory as a ready-to-use transformers model running its hybrid attention.

    Checks that the mask fits the weights (layer and KV-head counts, model fingerprint) and says what differs.
    """
    path = Path(path)
    section = read_export_config(path)
    allocation = Allocation.load(path / section.get("mask_file", MASK_FILE))
    # consa runs its own copy of the runtime; the export's modeling file is for loads without consa.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=False)
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    order = section.get("kv_head_order")
    if order is not None:  # weights stored FA heads first: fingerprint in the checkpoint's original order
        model.consa_kv_head_order = torch.tensor(order)
    allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads,
                          model_fingerprint(model))
    if section.get("loader") != LOADER_TRANSFORMERS:
        if order is not None:
            install_prefix_hybrid(model, section["full_heads_per_layer"], allocation.sliding_window,
                                  allocation.sink_tokens)
        else:  # an export from before KV heads were reordered at export: reorder in memory
            install_inference(model, allocation)
    model.consa_allocation = allocation
    if return_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model


__all__ = ["AllocationError", "ExportError", "ExportResult", "export_checkpoint", "load_hybrid", "native_config",
           "write_checkpoint"]
