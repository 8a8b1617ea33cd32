"""The installed package lives under its own import name and coexists with Hugging Face's ``kernels``.

Hugging Face's hub-kernel loader (the PyPI distribution ``kernels``, which transformers uses) installs a top-level
package ``kernels``; so did this project once, and pip let either distribution overwrite the other's files. Ours
installs as ``chapter3_flash`` (setup.py's package_dir). Here both are installed into one fresh venv, in both
orders, and both must import and work afterwards. Needs the package index (PyPI), as CI has.
"""

import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In the test venv: HF's package keeps its API; ours runs a small attention on a CPU, with torch (and triton)
# from this interpreter's site-packages (a second torch install would cost minutes).
CHECK = """
import kernels, torch
assert hasattr(kernels, "get_kernel"), kernels.__file__
from chapter3_flash.kernels import flash_attention
from chapter3_flash.attention import MultiHeadAttention
q = torch.randn(1, 2, 5, 8)
out = flash_attention(q, q, q, causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
torch.testing.assert_close(out, ref)
print(kernels.__file__)
"""


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-then-hf", "hf-then-ours"])
def test_installs_beside_hugging_face_kernels(tmp_path, ours_first):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # A regular (not editable) install, built from a copy of the sources (two cases may build at once).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "kernels", "attention", "chapter3_flash"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    ours = ("--no-deps", str(src))
    hf = ("kernels",)
    for args in (ours, hf) if ours_first else (hf, ours):
        _pip(python, *args)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    installed = sorted(p.name for p in Path(site).iterdir())
    assert "chapter3_flash" in installed and "kernels" in installed, installed
    # Nothing of ours inside HF's folder, nothing of HF's inside ours.
    assert not (Path(site) / "kernels" / "flash_attn.py").exists()
    assert (Path(site) / "chapter3_flash" / "kernels" / "flash_attn.py").exists()
    # This interpreter's torch and triton, after the venv's own packages (a .pth line appends to sys.path; the
    # folder's own .pth files, our editable install among them, are not read).
    (Path(site) / "parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run(
        [str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith(site), proc.stdout
