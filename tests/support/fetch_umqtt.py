"""Fetch umqtt.simple 1.3.4 (micropython-lib, MIT) from PyPI: `python3 fetch_umqtt.py DIR`.

Its sdist has no setup.py, so pip cannot install it; this downloads the pinned file, checks its
sha256 and unpacks `umqtt/simple.py` (standard library only: test.sh runs it before the venv).
"""

import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

URL = (
    "https://files.pythonhosted.org/packages/bd/cf/"
    "697e3418b2f44222b3e848078b1e33ee76aedca9b6c2430ca1b1aec1ce1d/"
    "micropython-umqtt.simple-1.3.4.tar.gz"
)
SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
MEMBER = "micropython-umqtt.simple-1.3.4/umqtt/simple.py"


def main(target: str) -> int:
    """Download, check and unpack; 0 when `target`/umqtt/simple.py is in place."""
    with urllib.request.urlopen(URL, timeout=60) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        print("umqtt.simple download does not match its pinned sha256", file=sys.stderr)
        return 1
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        source = archive.extractfile(MEMBER)
        assert source is not None
        out = Path(target) / "umqtt" / "simple.py"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(source.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
