"""Download pre-trained ViT checkpoints into pre-trained_weights/: by default the three ViT-B/16 ones
the VQT README points to; also ViT-L/16, ViT-H/14 (ImageNet-21k) and MoCo-v3 ViT-B when named.

Files get their MODEL_ZOO names (e.g. ViT-B_16.npz is saved as imagenet21k_ViT-B_16.npz). A download
goes to NAME.part first (an interrupted one resumes) and is renamed once it is complete, looks like
a checkpoint and matches the checksum upstream publishes (the md5 prefixes of VPT's README), where
one is known. Every file's sha256 is recorded in DEST/SHA256SUMS (`sha256sum -c` format); a later run
verifies present files against it. --mirror BASE fetches BASE/NAME instead (an institutional mirror,
a local http server, or file:///path).

--timm NAME [NAME ...] instead fills the local timm / Hugging Face cache with the weights of those
timm models (what MODEL.TIMM_NAME reads when MODEL.WEIGHT_PATH is empty), e.g.
`--timm vit_base_patch14_reg4_dinov2.lvd142m vit_base_patch16_clip_224.openai`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.configs.vit_configs import MODEL_ZOO
from src.errors import VQTError
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow

TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 60.0
STALL_BYTES = 16 << 10  # a download that gets less than this in the stall timeout has stalled
CHUNK = 1 << 20
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from: direct URL, page for a manual download, and what upstream publishes
    to check it, if anything: a full sha256 or the leading hex digits of its md5."""

    url: str
    page: str
    sha256: str | None = None
    md5_prefix: str | None = None


_DRIVE_ID = "1ruqA7gRkvkoM_QFrT0JI23XXZNnwqXBK"  # "ImageNet-1k Supervised" link of the VQT README
_IN21K = "https://storage.googleapis.com/vit_models/imagenet21k"  # Google's public ViT checkpoints
_MAE_B = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
_MOCO_B = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"  # as in VPT's README
SOURCES: dict[str, Source] = {  # md5 prefixes: the "md5sum" column of VPT's README (KMnP/vpt)
    "sup_vitb16_imagenet1k": Source(
        f"https://drive.usercontent.google.com/download?id={_DRIVE_ID}&export=download&confirm=t",
        f"https://drive.google.com/file/d/{_DRIVE_ID}/view"),
    "sup_vitb16_imagenet21k": Source(f"{_IN21K}/ViT-B_16.npz", f"{_IN21K}/ViT-B_16.npz", md5_prefix="d9715d"),
    "mae_vitb16": Source(_MAE_B, _MAE_B, md5_prefix="8cad7c"),
    "sup_vitl16_imagenet21k": Source(f"{_IN21K}/ViT-L_16.npz", f"{_IN21K}/ViT-L_16.npz"),
    "sup_vith14_imagenet21k": Source(f"{_IN21K}/ViT-H_14.npz", f"{_IN21K}/ViT-H_14.npz"),
    "mocov3_vitb": Source(_MOCO_B, "https://github.com/facebookresearch/moco-v3", md5_prefix="8f39ce"),
}
DEFAULT_FEATURES = ("sup_vitb16_imagenet1k", "sup_vitb16_imagenet21k", "mae_vitb16")  # the VQT README's three


def file_digests(path: Path) -> tuple[str, str]:
    """Hex sha256 and md5 of a file, read once in chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def read_sums(dest: Path) -> dict[str, str]:
    """File name -> sha256 from DEST/SHA256SUMS (empty when absent)."""
    path = dest / SUMS_FILE
    if not path.exists():
        return {}
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise VQTError(f"{path} line {n} is not '<sha256>  <file>': fix or delete {SUMS_FILE}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def write_sums(dest: Path, sums: dict[str, str]) -> None:
    """Rewrite DEST/SHA256SUMS atomically, sorted by file name."""
    tmp = dest / f"{SUMS_FILE}.tmp{os.getpid()}"
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    os.replace(tmp, dest / SUMS_FILE)


def check_format(path: Path, fmt: str) -> str | None:
    """Why `path` is not a checkpoint of format `fmt` ("npz": JAX npz with embedding/kernel; otherwise a
    torch.save file, zip or legacy pickle), or None when it looks right."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page, not a checkpoint (an error, login, quota or virus-scan page?)"
    if fmt == "npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as npz:
                return None if "embedding/kernel" in npz.files else "the npz has no 'embedding/kernel' array"
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            return f"not a readable .npz ({err})"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return None if any(n.endswith("data.pkl") for n in z.namelist()) else "a zip without data.pkl"
    return None if head.startswith(b"\x80\x02") else "neither a zip nor a pickle torch file"


def _download(url: str, part: Path, timeout: float, manual: str, stall_timeout: float) -> None:
    """Fetch `url` into `part`, resuming from its current size when the server supports ranges."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vqt-download-weights"} | ({"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # the .part is stale (already complete or longer): start over
            part.unlink()
            return _download(url, part, timeout, manual, stall_timeout)
        raise VQTError(f"HTTP {err.code} {err.reason} from {url}: {manual}") from None
    except ValueError as err:
        raise VQTError(f"bad URL {url!r} ({err}): check --mirror") from None
    except (urllib.error.URLError, OSError, HTTPException) as err:
        host = urllib.parse.urlsplit(url).netloc or url
        reason = getattr(err, "reason", err)
        raise VQTError(f"cannot reach {host} ({reason}): offline? {manual}") from None
    from tqdm import tqdm

    with resp:
        resumed = resp.status == 206
        if resumed and not resp.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
            raise VQTError(f"{url} answered a different byte range than asked: delete {part} and rerun")
        start = start if resumed else 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem,
                disable=None) as bar:
            try:
                _copy(resp, f, bar, stall_timeout)
            except TimeoutError:
                raise VQTError(f"download of {url} stalled after {f.tell()} bytes (see --stall-timeout): "
                               f"rerun to resume, use --mirror, or {manual}") from None
            except (OSError, HTTPException) as err:
                raise VQTError(f"download of {url} interrupted after {f.tell()} bytes ({err!r}): rerun to resume"
                               ) from None
    if total is not None and part.stat().st_size != total:
        raise VQTError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes: rerun to resume")


def _copy(resp, f, bar, stall_timeout: float) -> None:
    """Copy the body of `resp` into `f`; TimeoutError when less than STALL_BYTES arrive within `stall_timeout` s."""
    since, received = time.monotonic(), 0
    while chunk := resp.read1(CHUNK):
        f.write(chunk)
        bar.update(len(chunk))
        received += len(chunk)
        if received >= STALL_BYTES:
            since, received = time.monotonic(), 0
        elif time.monotonic() - since > stall_timeout:
            raise TimeoutError


def fetch(feature: str, dest: str | Path = "pre-trained_weights", mirror: str | None = None, force: bool = False,
          timeout: float = TIMEOUT_S, stall_timeout: float = STALL_TIMEOUT_S) -> str:
    """Make sure DEST holds the checkpoint of `feature` and SHA256SUMS lists it; returns what was done.

    A present file is verified against SHA256SUMS (or checked and recorded there); otherwise it is
    downloaded, checked (format, known sha256) and recorded. Raises VQTError on any problem."""
    if feature not in SOURCES:
        raise VQTError(f"no download source for {feature!r}; known: {', '.join(SOURCES)}")
    src, entry = SOURCES[feature], MODEL_ZOO[feature]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target, part = dest / entry.file, dest / f"{entry.file}.part"
    url = f"{mirror.rstrip('/')}/{entry.file}" if mirror else src.url
    manual = f"download {entry.file} manually from {url if mirror else src.page} into {dest}/"
    sums = read_sums(dest)
    if force:
        target.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if target.exists():
        digest, md5 = file_digests(target)
        if entry.file in sums and sums[entry.file] != digest:
            raise VQTError(f"{target} does not match {dest / SUMS_FILE} (expected {sums[entry.file]}, got "
                           f"{digest}): the file is corrupted or was replaced; rerun with --force to download it")
        problem = (None if entry.file in sums else check_format(target, entry.format)) or _unpublished(src, digest, md5)
        if problem:
            raise VQTError(f"{target}: {problem}; delete it or rerun with --force")
        if entry.file in sums:
            return f"{entry.file}: present, sha256 matches {SUMS_FILE}"
        write_sums(dest, sums | {entry.file: digest})
        return f"{entry.file}: present, sha256 recorded in {SUMS_FILE}"
    _download(url, part, timeout, manual, stall_timeout)
    digest, md5 = file_digests(part)
    problem = check_format(part, entry.format) or _unpublished(src, digest, md5)
    if problem:
        part.unlink()
        raise VQTError(f"{url}: {problem}: {manual}")
    os.replace(part, target)
    write_sums(dest, read_sums(dest) | {entry.file: digest})
    return f"{entry.file}: downloaded ({target.stat().st_size / 2**20:.1f} MiB), sha256 {digest}"


def _unpublished(src: Source, sha256: str, md5: str) -> str | None:
    """Why a file with these digests is not the checkpoint upstream publishes, or None (also when unknown)."""
    if src.sha256 and src.sha256 != sha256:
        return f"sha256 {sha256}, the published one is {src.sha256}"
    if src.md5_prefix and not md5.startswith(src.md5_prefix):
        return f"md5 {md5}, the published one starts with {src.md5_prefix}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES), choices=list(SOURCES), metavar="FEATURE",
                   help=f"DATA.FEATURE keys to fetch, of: {' '.join(SOURCES)}")
    p.add_argument("--dest", default="pre-trained_weights", help="folder (MODEL.MODEL_ROOT)")
    p.add_argument("--mirror", help="base URL serving the files under their MODEL_ZOO names (default: upstream)")
    p.add_argument("--force", action="store_true", help="download again even if the file is present")
    p.add_argument("--timm", nargs="+", default=[], metavar="NAME",
                   help="timm model names whose weights go to the timm / Hugging Face cache (instead of --features)")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="S",
                   help=f"give up when less than {STALL_BYTES >> 10} KiB arrive in S seconds (default %(default)g)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fetch every feature asked for; one line per feature; exit status 1 if any failed, 2 on bad input."""
    quiet_tensorflow()
    args = parse_args(argv)
    if args.timm:
        from src.models.timm_backbone import download_timm_weights

        jobs = {name: lambda name=name: f"{name}: {download_timm_weights(name)}" for name in args.timm}
    else:
        jobs = {feature: lambda feature=feature: fetch(feature, args.dest, args.mirror, args.force,
                                                       stall_timeout=args.stall_timeout) for feature in args.features}
    failed = 0
    for name, job in jobs.items():
        try:
            print(f"[ok] {job()}", flush=True)
        except VQTError as err:
            failed += 1
            print(f"error: {name}: {err}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
