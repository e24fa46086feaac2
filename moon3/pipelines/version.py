"""Names of what a pipeline run executes: the pipeline version and the image tags, from content hashes.

A git sha cannot name a committed compiled pipeline (the YAML would have to contain the sha of the commit that
adds it) and says nothing about uncommitted edits or compile settings. So both names come from content:

* the **source hash**: sha256 over the files an image is built from (``moon3/``, ``infra/`` configs, the
  Dockerfiles and their build script, ``pyproject.toml``, ``constraints.txt``, ``README.md``) as they are in the
  working tree;
* the **image tag** ``src-<source hash>``: ``make image`` tags the image it builds with it, and the compiled
  pipeline names it, so a pipeline and the image it needs always agree;
* the **pipeline version** ``<package version>+src.<source hash>.p.<params hash>[.dirty]``: the params hash
  covers every section, ``pipeline`` included, so the same code compiled with other settings is another version
  (no collision on upload); ``dirty`` marks sources that differ from the git commit they sit on.

``python -m moon3.pipelines.version image-tag`` prints the tag (what the Makefile uses).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

from moon3.common.provenance import git_output, params_hash

REPO = Path(__file__).resolve().parents[2]
# What an image is built from (the Dockerfiles' COPY lines and the install inputs).
IMAGE_SOURCES = ("moon3", "infra/accelerate", "infra/deepspeed", "infra/docker/Dockerfile",
                 "infra/docker/Dockerfile.cuda", "infra/docker/Dockerfile.dockerignore",
                 "infra/docker/Dockerfile.cuda.dockerignore", "infra/docker/build_image.sh", ".dockerignore",
                 "pyproject.toml", "constraints.txt", "README.md")  # fmt: skip
# What a compiled pipeline is built from besides the image sources.
PIPELINE_SOURCES = (*IMAGE_SOURCES, "components", "pipelines/training_pipeline.py")
HASH_LENGTH = 12


def package_version() -> str:
    """The installed ``moon3`` version (``pyproject.toml``)."""
    try:
        return importlib.metadata.version("moon3")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def source_files(repo: Path = REPO, sources: tuple[str, ...] = IMAGE_SOURCES) -> list[Path]:
    """The files under ``sources`` that belong to the project: tracked or untracked-but-not-ignored in git (so a
    new module counts before it is committed), or every file but caches outside a git checkout."""
    listed = git_output(repo, "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *sources)
    if listed is not None:
        files = {repo / name for name in listed.split("\0") if name}
    else:
        files = set()
        for src in sources:
            path = repo / src
            files.update([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()))
    skip = ("__pycache__", ".pyc", ".egg-info")
    return sorted(p for p in files if p.is_file() and not any(s in str(p) for s in skip))


def source_hash(repo: Path = REPO, sources: tuple[str, ...] = IMAGE_SOURCES) -> str:
    """First :data:`HASH_LENGTH` hex characters of the sha256 over ``(path, bytes)`` of :func:`source_files`."""
    digest = hashlib.sha256()
    for path in source_files(repo, sources):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:HASH_LENGTH]


def sources_dirty(repo: Path = REPO, sources: tuple[str, ...] = PIPELINE_SOURCES) -> bool:
    """Whether any of ``sources`` differs from ``HEAD`` (an edit, or a new file not committed); False outside git."""
    out = git_output(repo, "status", "--porcelain", "--", *sources)
    return bool(out and out.strip())


def image_tag(repo: Path = REPO) -> str:
    """``src-<source hash>``: the tag ``make image`` gives the images built from this working tree."""
    return f"src-{source_hash(repo)}"


def image_ref(repository: str, tag: str) -> str:
    """``repository:tag``; a ``repository`` that already names a tag or digest is kept as it is."""
    last = repository.rsplit("/", 1)[-1]
    return repository if (":" in last or "@" in repository) else f"{repository}:{tag}"


def pipeline_version(cfg: Any = None, repo: Path = REPO) -> str:
    """``<package version>+src.<source hash>.p.<params hash>[.dirty]`` (a PEP 440 local version).

    Args:
        cfg: the whole config the pipeline is compiled with (None: no params part).
        repo: the checkout.
    """
    parts = [f"src.{source_hash(repo, PIPELINE_SOURCES)}"]
    if cfg is not None:
        parts.append(f"p.{params_hash(cfg.to_dict(), 8)}")
    if sources_dirty(repo):
        parts.append("dirty")
    return f"{package_version()}+{'.'.join(parts)}"


def main(argv: list[str] | None = None) -> int:
    """``image-tag`` | ``source-hash``: print it (for the Makefile and CI)."""
    args = argv if argv is not None else sys.argv[1:]
    if args == ["image-tag"]:
        print(image_tag())
    elif args == ["source-hash"]:
        print(source_hash())
    else:
        print("usage: python -m moon3.pipelines.version image-tag|source-hash", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
