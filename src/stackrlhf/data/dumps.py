"""Find a site's dump: an explicit folder, ``.7z`` or URL; else by site name in ``$STACKRLHF_DUMPS``,
then ``../shared/data/stackexchange`` beside the repository, then the cache, then a download."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from stackrlhf.data.fetch import DEFAULT_BASE_URL, default_cache_dir, download, fetch_site, unpack_7z
from stackrlhf.errors import DumpError

REPO_ROOT = Path(__file__).resolve().parents[3]
_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*\.[a-z]+$")


@dataclass(frozen=True)
class Dump:
    """An unpacked dump on disk: ``folder`` holds Posts.xml and maybe Votes.xml, Users.xml, Comments.xml."""

    site: str
    folder: Path

    def file(self, name: str) -> Path | None:
        path = self.folder / name
        return path if path.is_file() else None


def normalise_site(name: str) -> str:
    """``beer`` -> ``beer.stackexchange.com``; full host names are kept."""
    name = name.strip().lower().rstrip("/")
    return name if "." in name else f"{name}.stackexchange.com"


def shared_dump_dirs() -> list[Path]:
    """Folders searched by site name, in order."""
    dirs = []
    env = os.environ.get("STACKRLHF_DUMPS")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(REPO_ROOT.parent / "shared" / "data" / "stackexchange")
    dirs.append(Path.cwd().parent / "shared" / "data" / "stackexchange")
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _site_from_archive(path: Path) -> str:
    name = path.name
    for suffix in (".7z",):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"-(Posts|Votes|Users|Comments)$", "", name)


def _folder_dump(folder: Path, site: str | None = None) -> Dump:
    if not (folder / "Posts.xml").is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise DumpError(f"{folder}: no Posts.xml in this dump folder (found: {present})")
    return Dump(site=site or folder.name, folder=folder)


def _unpacked(archive: Path, cache_dir: Path, site: str) -> Dump:
    target = cache_dir / "unpacked" / f"{site}-{archive.stat().st_size}-{int(archive.stat().st_mtime)}"
    if not (target / "Posts.xml").is_file():
        unpack_7z(archive, target)
    return _folder_dump(target, site)


def resolve_dump(spec: str | os.PathLike, cache_dir: Path | None = None, base_url: str = DEFAULT_BASE_URL,
                 download_missing: bool = True) -> Dump:
    """Turn a user's ``--dump`` value (folder, ``.7z``, URL or site name) into an unpacked :class:`Dump`."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    text = str(spec)
    if text.startswith(("http://", "https://")):
        archive_name = Path(urlparse(text).path).name or "dump.7z"
        site = _site_from_archive(Path(archive_name))
        archive = download(text, cache_dir / "archives" / archive_name)
        return _unpacked(archive, cache_dir, site)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_dump(path)
    if path.is_file():
        if path.suffix == ".7z":
            return _unpacked(path, cache_dir, _site_from_archive(path))
        if path.name == "Posts.xml":
            return _folder_dump(path.parent)
        raise DumpError(f"{path}: expected a dump folder, a .7z archive, a URL or a site name")
    if os.sep in text or text.endswith(".7z"):
        raise DumpError(f"{path}: no such file or folder")
    site = normalise_site(text)
    if not _SITE_RE.match(site):
        raise DumpError(f"{text!r}: not a folder, .7z, URL or site name (like beer.stackexchange.com)")
    for root in shared_dump_dirs():
        if (root / site / "Posts.xml").is_file():
            return _folder_dump(root / site, site)
        if (root / f"{site}.7z").is_file():
            return _unpacked(root / f"{site}.7z", cache_dir, site)
    if (cache_dir / site / "Posts.xml").is_file():
        return _folder_dump(cache_dir / site, site)
    if not download_missing:
        searched = ", ".join(str(d) for d in shared_dump_dirs())
        raise DumpError(f"{site}: no dump found (searched {searched}, {cache_dir}) and downloads are off")
    return Dump(site=site, folder=fetch_site(site, cache_dir, base_url))
