"""Downloading pinned public files: once, verified, never half-written.

Every file this project obtains from the internet is named by a repository at a
pinned commit, a path in that repository and the sha256 of its bytes. By
default it is fetched from GitHub's raw-file server,

    https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>

and a base URL (``MEGNET_PT_BASE_URL``, or an argument) replaces that
with a mirror laid out as ``<base>/<repository folder>/<path>``: another web
server, or a local folder given as a ``file://`` URL or a plain path.

``download`` writes to a temporary name beside the destination and renames it
only once the whole file has arrived and its sha256 matches, so a file under
its final name is always complete and verified; a file already there with the
right sha256 is reused without touching the network.

``fetch_published_weights`` uses it to put the published MEGNet weights of the
matgl repository into ``$MEGNET_PT_HOME/weights/<name>/`` (see ``paths``), or a folder the caller names.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import paths

BASE_URL_ENV = "MEGNET_PT_BASE_URL"
GITHUB_RAW = "https://raw.githubusercontent.com"
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_USER_AGENT = "megnet_pt/0.1 (Python urllib)"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: setting the umask to read it is not safe while download threads run.
UMASK = _current_umask()


class DownloadError(RuntimeError):
    """A file could not be obtained; the message names the URL and what to do.

    ``transient`` marks failures worth another try (a transfer cut short, HTTP 429 or 5xx).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ChecksumError(DownloadError):
    """A downloaded file's sha256 differs from the pinned one (nothing was saved)."""


@dataclass(frozen=True)
class Repository:
    """A public GitHub repository at a pinned commit.

    ``folder`` is the repository's folder in a mirror (``<base>/<folder>/<path>``).
    """

    folder: str
    owner: str
    name: str
    commit: str

    def url(self, path: str, base_url: str | None = None) -> str:
        """The URL of ``path`` at the pinned commit, or in the mirror ``base_url``."""
        quoted = urllib.parse.quote(path.lstrip("/"))
        if base_url is None:
            return f"{GITHUB_RAW}/{self.owner}/{self.name}/{self.commit}/{quoted}"
        return f"{base_url.rstrip('/')}/{self.folder}/{quoted}"


def resolve_base_url(base_url: str | os.PathLike | None = None, env_var: str = BASE_URL_ENV) -> str | None:
    """The mirror to download from: the argument, else ``$<env_var>``, else None (GitHub).

    A value without a URL scheme is taken as a local folder and turned into a
    ``file://`` URL, so ``--base-url ../shared/upstream`` works as written.
    """
    value = os.fspath(base_url) if base_url is not None else os.environ.get(env_var, "")
    value = value.strip()
    if not value:
        return None
    if "://" not in value:
        return Path(value).expanduser().resolve().as_uri()
    return value.rstrip("/")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def use_base_url(value: str | os.PathLike | None, env_var: str = BASE_URL_ENV) -> None:
    """An entry point's ``--base-url``: the mirror for everything this process downloads (sets ``env_var``)."""
    if value:
        os.environ[env_var] = resolve_base_url(value, env_var) or os.fspath(value)


def default_advice() -> str:
    """What megnet_pt's own users can do when a download fails."""
    return (f"pass --base-url (python -m megnet_pt.predict takes it) or set ${BASE_URL_ENV} to a mirror laid out as "
            "<base>/<repository folder>/<path in repository>, or set "
            f"${paths.ENV_VAR} to a folder that already holds weights/<model>/state.pt + model.json (now {paths.home()})")


def _what_to_do(url: str, advice: str | None) -> str:
    if url.startswith("file:"):
        where = ("The mirror has no such file: check that the base URL names a folder laid out as "
                 "<base>/<repository folder>/<path in repository>")
    else:
        where = "This machine may be offline, or the server unreachable. Connect to the internet and run again"
    return f"{where}; or {advice or default_advice()}."


def _remove(path: str | Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _attempt(url: str, dest: Path, sha256: str, timeout: float, advice: str | None) -> None:
    """One download of ``url`` to a temporary file, verified, then renamed to ``dest``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise DownloadError(
                    f"cannot download {url}: the server answered HTTP {exc.code} {exc.reason}. {_what_to_do(url, advice)}",
                    transient=exc.code == 429 or exc.code >= 500,
                ) from exc
            except urllib.error.URLError as exc:
                raise DownloadError(f"cannot download {url}: {exc.reason}. {_what_to_do(url, advice)}") from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise DownloadError(f"cannot download {url}: {exc}. {_what_to_do(url, advice)}") from exc
            with response:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise DownloadError(
                            f"the download of {url} was interrupted after {size} bytes ({exc!r}). {_what_to_do(url, advice)}",
                            transient=True,
                        ) from exc
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        got = digest.hexdigest()
        if got != sha256:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} ({size} bytes); "
                f"nothing was saved to {dest}. The source or mirror does not hold the pinned file "
                f"(it changed, or the transfer was corrupted): run again, use a mirror that holds the pinned "
                f"files, or {advice or default_advice()}."
            )
        os.chmod(tmp, 0o666 & ~UMASK)  # temporary files are private; the cache is not
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def download(url: str, dest: str | Path, sha256: str, timeout: float = TIMEOUT_S, retries: int = 2,
             advice: str | None = None) -> Path:
    """Put the file at ``url`` at ``dest``, checked against ``sha256``; return ``dest``.

    Reuses ``dest`` when it already holds the right bytes. Otherwise the file is
    streamed into a temporary file in the same folder, hashed on the way, and
    renamed to ``dest`` only when complete and verified; on any failure the
    temporary file is removed and ``dest`` is left as it was. A transfer cut
    short, or a server answering 429 or 5xx, is tried again up to ``retries``
    times (after 1 s, 2 s, ...); an unreachable host fails at once. Raises
    ``DownloadError`` or ``ChecksumError``, each naming the URL and what to do
    (``advice``: the caller's own words for the last resort, e.g. its settings).
    """
    dest = Path(dest)
    sha256 = sha256.lower()
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _attempt(url, dest, sha256, timeout, advice)
            return dest
        except DownloadError as exc:
            if not exc.transient or attempt == retries:
                raise
            time.sleep(2**attempt)
    return dest


def download_all(
    files: Iterable[tuple[str, str | Path, str]], workers: int = 8, desc: str | None = None,
    advice: str | None = None,
) -> list[Path]:
    """``download`` each ``(url, dest, sha256)``, a few at a time, with a progress bar.

    Many small files from a web server are limited by round trips, not by
    bandwidth, so they are fetched by ``workers`` threads. The first error is
    raised once the downloads already under way have finished.
    """
    from tqdm import tqdm

    files = list(files)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download, url, dest, sha, advice=advice) for url, dest, sha in files]
        try:
            done = []
            for future in tqdm(futures, desc=desc, unit="file", file=sys.stderr, leave=False, disable=not files):
                done.append(future.result())
            return done
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# The published MEGNet models, as stored in the matgl repository. The commit is
# the one mirrored in ../shared/upstream; these weight files have not changed
# since commit 53b52ae6926f8273e74bc4b80899ff554a6a5d37.
MATGL = Repository("matgl", "materialsvirtuallab", "matgl", "e9cde2291acd0b4c4a342428e7dd5e4d596b7bf9")

PUBLISHED_WEIGHTS: dict[str, dict[str, str]] = {
    "MEGNet-MP-2018.6.1-Eform": {
        "state.pt": "35381368b17a2783f9ee09af5556cf1d84b74bf786b82d3fadd4acb38c51d040",
        "model.json": "d858219134667d55e3c183435475ba248231a67311573373ed7298191f05d0a4",
    },
    "MEGNet-MP-2019.4.1-BandGap-mfi": {
        "state.pt": "2927ab9646ec3e099a3e42b1358a3c477db7356e2413bfa540fe0106cde628f9",
        "model.json": "9f8f4b8709e97c6ce25353f6b6c322ce3b5e031c71115cf6b94d5cd794f39bc2",
    },
}


def published_weights_urls(name: str, base_url: str | None = None) -> dict[str, str]:
    """The URL of each file of the published model ``name``."""
    if name not in PUBLISHED_WEIGHTS:
        raise ValueError(f"no published weights named {name!r}; known: {', '.join(PUBLISHED_WEIGHTS)}")
    base = resolve_base_url(base_url)
    return {f: MATGL.url(f"pretrained_models/{name}/{f}", base) for f in PUBLISHED_WEIGHTS[name]}


def mirrored_weights(name: str, base_url: str | None = None) -> Path | None:
    """The folder of ``name``'s published files inside a local mirror (a folder or ``file://`` base URL), to be
    read in place, nothing copied; None when the mirror is remote or lacks them. A file there with another
    sha256 than the pinned one is refused (``ChecksumError``)."""
    base = resolve_base_url(base_url)
    if name not in PUBLISHED_WEIGHTS or base is None or not base.startswith("file://"):
        return None
    folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(MATGL.url(f"pretrained_models/{name}", base)).path))
    if not all((folder / f).is_file() for f in PUBLISHED_WEIGHTS[name]):
        return None
    for file, sha in PUBLISHED_WEIGHTS[name].items():
        got = sha256_file(folder / file)
        if got != sha:
            raise ChecksumError(f"{folder / file}: sha256 {got}, expected the published file's {sha}; "
                                "the mirror's copy is damaged or another file")
    return folder


def fetch_published_weights(name: str = "MEGNet-MP-2018.6.1-Eform", base_url: str | None = None,
                            folder: str | Path | None = None, advice: str | None = None) -> Path:
    """Make sure ``<folder>/{state.pt,model.json}`` hold the pinned files (default ``$MEGNET_PT_HOME/weights/<name>``).

    Files already there with the pinned sha256 are reused (no network);
    missing ones are downloaded from matgl at the pinned commit, or from the
    mirror ``base_url`` (a URL or folder; None: ``$MEGNET_PT_BASE_URL``, else
    GitHub). Returns the folder.
    """
    folder = Path(folder) if folder is not None else paths.weights_dir(name)
    for file, url in published_weights_urls(name, base_url).items():
        dest, sha = folder / file, PUBLISHED_WEIGHTS[name][file]
        if dest.is_file() and sha256_file(dest) == sha:
            continue
        print(f"downloading {url}", file=sys.stderr)
        download(url, dest, sha, advice=advice)
    return folder
