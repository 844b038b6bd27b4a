"""`vae shard FOLDER OUT`: a folder of images as WebDataset shards (tar files of samples
<key>.<ext>, plus <key>.cls with the class id when the images lie in class sub-folders),
written with webdataset's ShardWriter; train on them with dataset=webdataset."""

from __future__ import annotations

import os
from pathlib import Path

from vae_cli.commands.plain import Parser
from vae_cli.errors import UserError, one_line


def main(argv: list[str]) -> int:
    parser = Parser(prog="vae shard", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of images (class sub-folders: labels)")
    parser.add_argument("out", help="a folder for the shards (created; must hold none)")
    parser.add_argument("--per-shard", type=int, default=1000,
                        help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default="shards", help="shard names: <prefix>-NNNNNN.tar")
    args = parser.parse_args(argv)
    if args.per_shard < 1:
        raise UserError(f"--per-shard {args.per_shard} must be >= 1")
    check_prefix(args.prefix)
    written = write_shards(Path(args.folder), Path(args.out), args.per_shard, args.prefix)
    last = len(written) - 1
    urls = f"{Path(args.out).resolve()}/{args.prefix}-{{000000..{last:06d}}}.tar"
    print(f"wrote {sum(n for _, n in written)} samples in {len(written)} shards; train on "
          f"them with: vae train dataset=webdataset 'dataset.urls=\"{urls}\"'")
    return 0


def check_prefix(prefix: str) -> None:
    """A prefix is a file name: a path in it would write the shards outside OUT, and a % would
    be read as a format by webdataset's ShardWriter."""
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if not prefix or ".." in prefix or "%" in prefix or any(s in prefix for s in seps):
        raise UserError(f"--prefix {prefix!r} must be a plain file name (no /, \\, .. or %): "
                        "the shards go into OUT")


def write_shards(folder: Path, out: Path, per_shard: int, prefix: str
                 ) -> list[tuple[Path, int]]:
    """The images' bytes as they are (not re-encoded), in sorted order; keys are their
    paths under ``folder`` (dots made underscores: a key holds none)."""
    try:
        import webdataset
    except ImportError:
        raise UserError("vae shard needs the webdataset package: pip install "
                        "'vae-cli[stream]'") from None
    from vae_cli.data.folder import EXTENSIONS, class_labels

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS
                   and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) under {folder}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; OUT must be a folder for the shards")
    if out.exists() and any(out.glob(f"{prefix}-*.tar")):
        raise UserError(f"{out} already holds {prefix}-*.tar shards; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the shards' folder {out} ({one_line(e)})") from None
    labels = class_labels(folder, files)
    counts: dict[str, int] = {}
    with webdataset.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=per_shard,
                                verbose=0) as sink:
        for i, f in enumerate(files):
            key = str(f.relative_to(folder).with_suffix("")).replace(".", "_")
            sample = {"__key__": key, f.suffix[1:].lower(): f.read_bytes()}
            if labels is not None:
                sample["cls"] = int(labels[i])
            sink.write(sample)
            name = sink.fname
            counts[name] = counts.get(name, 0) + 1
    return [(Path(name), n) for name, n in counts.items()]
