"""What the Ingress and the Generator replica agree on: the multiplexed id of an adapter set, and the generator's
errors that the Ingress catches.

Torch-free: the Ingress replica imports this, never serve.generator (torch, diffusers, peft). An exception raised in
the Generator reaches the Ingress as the same class only if both processes import it from the same module: here.
"""

from __future__ import annotations


class GeneratorError(RuntimeError):
    """The generator could not load an adapter or run the pipeline."""


class NonFiniteOutput(GeneratorError):
    """The transformer's output went NaN or infinite during denoising: the image would be all black."""


def adapter_set_id(files: list[dict]) -> str:
    """Multiplexed model id of the files [{key, sha256}] (order matters: it is the adapter order)."""
    return "|".join(f"{f['key']}#{f['sha256']}" for f in files)


def parse_adapter_set_id(model_id: str) -> list[dict]:
    if not model_id:
        return []
    files = []
    for part in model_id.split("|"):
        key, sep, sha = part.rpartition("#")
        if not sep or not key or len(sha) != 64:
            raise GeneratorError(f"malformed adapter set id part {part!r}")
        files.append({"key": key, "sha256": sha})
    return files
