"""Download and unpack official Stack Exchange dump archives (``<site>.7z``), with retries and resume."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import requests
from tqdm.auto import tqdm

from stackrlhf.errors import DumpError

# The public archive.org mirror of the official dumps: https://archive.org/details/stackexchange
DEFAULT_BASE_URL = "https://archive.org/download/stackexchange"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def default_cache_dir() -> Path:
    """``$STACKRLHF_CACHE``, else ``~/.cache/stackrlhf``."""
    env = os.environ.get("STACKRLHF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stackrlhf"


def archive_names(site: str) -> list[str]:
    """Archive file names of a site's dump. Stack Overflow ships one archive per table."""
    if site == "stackoverflow.com":
        return [f"{site}-{table}.7z" for table in ("Posts", "Votes", "Users")]
    return [f"{site}.7z"]


def download(url: str, dest: Path, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0,
             chunk_bytes: int = 1 << 16, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``. Bytes land in ``dest.part`` first; an interrupted download resumes from
    there with an HTTP Range request; transient failures are retried with exponential back-off; ``dest``
    appears only once complete."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, stream=True, headers=headers, timeout=timeout_s) as resp:
                if resp.status_code == 404:
                    raise DumpError(f"{url}: not found (HTTP 404); check the site name and --base-url")
                if resp.status_code == 416 and have:
                    part.unlink()  # our partial file is not a prefix the server knows: start over
                    last_error = "HTTP 416 on resume"
                    continue
                if resp.status_code in _RETRY_STATUS:
                    last_error = f"HTTP {resp.status_code}"
                    continue
                if resp.status_code not in (200, 206):
                    raise DumpError(f"{url}: download failed (HTTP {resp.status_code} {resp.reason})")
                if resp.status_code == 200 and have:
                    have = 0  # the server ignored the Range header: take the whole body again
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as fh, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    for chunk in resp.iter_content(chunk_size=chunk_bytes):
                        fh.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                last_error = f"connection closed after {size} of {total} bytes"
                continue
            os.replace(part, dest)
            return dest
        except DumpError:
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
    raise DumpError(f"{url}: download failed after {retries + 1} attempts ({last_error}); "
                    f"run the same command again to resume")


def unpack_7z(archive: Path, dest_dir: Path) -> Path:
    """Extract a ``.7z`` archive into ``dest_dir`` (via a temp dir and a rename: never half-extracted)."""
    import py7zr

    archive = Path(archive)
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        try:
            with py7zr.SevenZipFile(archive, mode="r") as z:
                z.extractall(path=tmp)
        except (py7zr.Bad7zFile, py7zr.exceptions.ArchiveError, EOFError, OSError, ValueError) as exc:
            raise DumpError(f"{archive}: not a valid or complete 7z archive ({exc}); "
                            f"delete it and download it again") from exc
        if dest_dir.exists():
            # Merge (Stack Overflow's per-table archives land in one folder).
            for item in tmp.iterdir():
                os.replace(item, dest_dir / item.name)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest_dir


def fetch_site(site: str, cache_dir: Path | None = None, base_url: str = DEFAULT_BASE_URL,
               retries: int = 5, progress: bool = True) -> Path:
    """Download and unpack ``site``'s dump into ``cache_dir/<site>/``; reuse it when already there."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / site
    if (folder / "Posts.xml").is_file():
        return folder
    for name in archive_names(site):
        archive = download(f"{base_url.rstrip('/')}/{name}", cache_dir / "archives" / name,
                           retries=retries, progress=progress)
        unpack_7z(archive, folder)
    if not (folder / "Posts.xml").is_file():
        raise DumpError(f"{site}: the downloaded archive holds no Posts.xml")
    return folder
