"""Safety of the remote code: the four files a checkpoint carries (and `trust_remote_code=True` runs) are scanned with
`ast` for network access, processes, code execution, unsafe deserialisation and file writes; a planted file shows that
every rule fires. A checkpoint cached as from the Hub loads, pinned to a revision, with the network cut off.

Allowed on purpose (see README, "Remote code"): `from_pretrained` of the processor's own parts (transformers' loader,
which honours `HF_HUB_OFFLINE`, `local_files_only` and `revision`), and `transformers.image_utils.load_image` in
image_processing_flashsloth.py, which downloads an image only when the user passes an http(s) URL as the image.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_helpers import save_tiny_checkpoint
from processing_helpers import make_tiny_processor


ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = [
    ROOT / "flashsloth" / "configuration_flashsloth.py",
    ROOT / "flashsloth" / "modeling_flashsloth.py",
    ROOT / "flashsloth" / "layout_flashsloth.py",
    ROOT / "flashsloth" / "outputs_flashsloth.py",
    ROOT / "flashsloth" / "processing" / "image_processing_flashsloth.py",
    ROOT / "flashsloth" / "processing" / "processing_flashsloth.py",
]

# Modules whose mere import is refused: network, processes, native code, (de)serialisation of code, file trees.
FORBIDDEN_MODULES = {
    "socket": "network", "ssl": "network", "urllib": "network", "http": "network", "requests": "network",
    "httpx": "network", "aiohttp": "network", "ftplib": "network", "smtplib": "network", "xmlrpc": "network",
    "huggingface_hub": "network", "subprocess": "process", "multiprocessing": "process", "pty": "process",
    "ctypes": "native code", "importlib": "code execution", "runpy": "code execution", "code": "code execution",
    "pickle": "deserialisation", "_pickle": "deserialisation", "dill": "deserialisation", "marshal": "deserialisation",
    "shelve": "deserialisation", "joblib": "deserialisation", "shutil": "file write", "tempfile": "file write",
}
FORBIDDEN_BUILTINS = {"exec": "code execution", "eval": "code execution", "compile": "code execution",
                      "__import__": "code execution"}
# Fully resolved call names (after following the file's imports); a trailing `*` matches any suffix.
FORBIDDEN_CALLS = {
    "os.system": "process", "os.popen": "process", "os.exec*": "process", "os.spawn*": "process",
    "os.fork*": "process", "os.posix_spawn*": "process", "os.kill": "process", "os.remove": "file write",
    "os.unlink": "file write", "os.rmdir": "file write", "os.removedirs": "file write", "os.rename": "file write",
    "os.renames": "file write", "os.replace": "file write", "os.mkdir": "file write", "os.makedirs": "file write",
    "os.truncate": "file write", "os.chmod": "file write", "os.symlink": "file write", "os.link": "file write",
    "torch.save": "file write", "torch.hub.*": "network",
}
# Callees that reach the network or the Hub whatever module they come from (matched on the last name).
NETWORK_FUNCTIONS = {"hf_hub_download", "snapshot_download", "cached_file", "cached_files", "download_url",
                     "urlopen", "urlretrieve", "load_image", "load_images", "load_video", "fetch_images"}
# Methods that write files, whatever object they are called on.
WRITING_METHODS = {"write_text", "write_bytes", "touch", "unlink", "rmdir", "symlink_to", "hardlink_to"}
# (file name, rule, callee) pairs that are allowed, each for the reason in the module docstring.
ALLOWED = {("image_processing_flashsloth.py", "network", "transformers.image_utils.load_image")}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str
    what: str


def dotted_name(node: ast.AST) -> str | None:
    """`a.b.c` for a Name/Attribute chain, None for anything else (calls, subscripts...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the full dotted name it stands for, from the file's import statements."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                names[local] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def resolve(name: str, imports: dict[str, str]) -> str:
    head, _, rest = name.partition(".")
    full = imports.get(head, head)
    full = {"np": "numpy"}.get(full, full)
    return f"{full}.{rest}" if rest else full


def keyword_is_constant(call: ast.Call, name: str, value) -> bool:
    return any(
        keyword.arg == name and isinstance(keyword.value, ast.Constant) and keyword.value.value is value
        for keyword in call.keywords
    )


def literal_mode(call: ast.Call, position: int | None) -> str | None:
    """The file mode of an `open`-like call: the `mode=` keyword or the argument at `position`; 'r' when absent, None
    when it is not a literal string."""
    node = next((kw.value for kw in call.keywords if kw.arg == "mode"), None)
    if node is None and position is not None and len(call.args) > position:
        node = call.args[position]
    if node is None:
        return "r"
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def writes(mode: str | None) -> bool:
    return mode is None or bool(set(mode) & set("wax+"))


def call_findings(call: ast.Call, imports: dict[str, str]) -> list[tuple[str, str]]:
    """(rule, what) pairs for one call."""
    name = dotted_name(call.func)
    full = resolve(name, imports) if name else ""
    found = []
    if full in FORBIDDEN_BUILTINS:
        found.append((FORBIDDEN_BUILTINS[full], full))
    if full in ("open", "io.open") and writes(literal_mode(call, 1)):
        found.append(("file write", f"{full}(mode={literal_mode(call, 1)!r})"))
    if full == "torch.load" and not keyword_is_constant(call, "weights_only", True):
        found.append(("deserialisation", "torch.load without weights_only=True"))
    if full == "numpy.load" and keyword_is_constant(call, "allow_pickle", True):
        found.append(("deserialisation", "numpy.load(allow_pickle=True)"))
    for pattern, rule in FORBIDDEN_CALLS.items():
        if full == pattern or (pattern.endswith("*") and full.startswith(pattern[:-1])):
            found.append((rule, full))
    if full.rsplit(".", 1)[-1] in NETWORK_FUNCTIONS:
        found.append(("network", full))
    if isinstance(call.func, ast.Attribute) and full not in ("io.open",):
        if call.func.attr in WRITING_METHODS:
            found.append(("file write", f".{call.func.attr}()"))
        # `Path.open("w")` and the like; `Image.open(path)` has no literal mode and reads.
        first = call.args[0] if call.args else None
        is_mode = isinstance(first, ast.Constant) and re.fullmatch(r"[rwxabt+]{1,3}", str(first.value)) is not None
        mode_position = 0 if is_mode else None
        if call.func.attr == "open" and writes(literal_mode(call, mode_position)):
            found.append(("file write", f".open(mode={literal_mode(call, mode_position)!r})"))
    return found


def scan_source(source: str, file_name: str) -> list[Finding]:
    """Every forbidden import and call in a Python source, minus the `ALLOWED` ones."""
    tree = ast.parse(source, filename=file_name)
    imports = imported_names(tree)
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                rule = FORBIDDEN_MODULES.get(module.split(".")[0]) if getattr(node, "level", 0) == 0 else None
                if rule:
                    findings.append(Finding(file_name, node.lineno, rule, f"import {module}"))
        elif isinstance(node, ast.Call):
            for rule, what in call_findings(node, imports):
                if (file_name, rule, what) not in ALLOWED:
                    findings.append(Finding(file_name, node.lineno, rule, what))
    return findings


def scan_file(path: Path) -> list[Finding]:
    return scan_source(path.read_text(encoding="utf-8"), path.name)


@pytest.mark.parametrize("path", REMOTE_CODE_FILES, ids=[path.name for path in REMOTE_CODE_FILES])
def test_remote_code_has_no_forbidden_calls(path):
    assert scan_file(path) == []


def test_remote_code_imports_only_torch_transformers_pil_numpy_stdlib_and_siblings():
    allowed_roots = {"torch", "transformers", "PIL", "numpy", *sys.stdlib_module_names}
    for path in REMOTE_CODE_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in {
                    "configuration_flashsloth",
                    "layout_flashsloth",
                    "outputs_flashsloth",
                    "image_processing_flashsloth",
                }
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {module.split(".")[0] for module in modules} <= allowed_roots, (path.name, modules)


PLANTED = {
    "import socket": "network",
    "from urllib.request import urlopen": "network",
    "import requests": "network",
    "import http.client as client": "network",
    "from huggingface_hub import snapshot_download": "network",
    "from transformers.utils import cached_file\ncached_file('repo', 'x.json')": "network",
    "from transformers.image_utils import load_image\nload_image('http://example.com/x.png')": "network",
    "import torch\ntorch.hub.load('owner/repo', 'model')": "network",
    "import subprocess": "process",
    "import os\nos.system('ls')": "process",
    "import os as o\no.popen('ls')": "process",
    "from os import execv\nexecv('/bin/sh', [])": "process",
    "exec('x = 1')": "code execution",
    "eval('1 + 1')": "code execution",
    "compile('1', 'f', 'eval')": "code execution",
    "__import__('os')": "code execution",
    "import importlib": "code execution",
    "import pickle": "deserialisation",
    "import marshal": "deserialisation",
    "import torch\ntorch.load('x.pt')": "deserialisation",
    "import torch\ntorch.load('x.pt', weights_only=False)": "deserialisation",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)": "deserialisation",
    "open('x.txt', 'w')": "file write",
    "open('x.txt', mode='ab')": "file write",
    "open('x.txt', 'r+')": "file write",
    "mode = 'w'\nopen('x.txt', mode)": "file write",
    "from pathlib import Path\nPath('x').write_text('x')": "file write",
    "from pathlib import Path\nPath('x').open('wb')": "file write",
    "import os\nos.remove('x')": "file write",
    "import shutil": "file write",
    "import torch\ntorch.save({}, 'x.pt')": "file write",
}


@pytest.mark.parametrize("source", PLANTED, ids=list(range(len(PLANTED))))
def test_scanner_flags_each_planted_call(tmp_path, source):
    path = tmp_path / "modeling_flashsloth.py"  # planted under a remote-code name: no allowance applies
    path.write_text(f"import torch\n\n\ndef planted():\n{textwrap.indent(source, '    ')}\n")
    findings = scan_file(path)
    assert [finding.rule for finding in findings] == [PLANTED[source]], findings
    # The allowance of load_image is tied to image_processing_flashsloth.py and to nothing else.
    if "load_image" in source:
        allowed_copy = tmp_path / "image_processing_flashsloth.py"
        shutil.copy(path, allowed_copy)
        assert scan_file(allowed_copy) == []


def test_scanner_accepts_safe_code():
    safe = textwrap.dedent(
        """
        import os
        import numpy as np
        import torch
        from pathlib import Path

        torch.load("x.pt", weights_only=True)
        np.load("x.npy")
        open("x.txt").read()
        open("x.txt", "rb").read()
        Image.open("x.png").load()
        Path("x").open().read()
        os.path.join("a", "b")
        model.compile_graph()
        self.evaluate()
        """
    )
    assert scan_source(safe, "modeling_flashsloth.py") == []


# Offline loading from a Hub cache, pinned to a revision

REPO_ID = "flashsloth-tests/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

OFFLINE_SCRIPT = """
import socket
import sys

def no_network(*args, **kwargs):
    raise AssertionError("network access while loading")

socket.socket.connect = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network
sys.modules["flashsloth"] = None  # only the checkpoint's flat remote-code files

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

repo, revision, image_path = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, revision=revision)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image_path)], text=prompt)
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True, revision=revision)
content = [{"type": "image", "image": image_path}, {"type": "text", "text": "What is it?"}]
answer = pipe(text=[{"role": "user", "content": content}], max_new_tokens=4, return_full_text=False)
print("ids", output[0, inputs["input_ids"].shape[1]:].tolist())
print("pipeline", repr(answer[0]["generated_text"]))
"""


def fill_hub_cache(cache: Path, checkpoint: Path) -> None:
    """Lay out `checkpoint` as huggingface_hub caches a download of REPO_ID at COMMIT (refs/main -> COMMIT)."""
    repo_dir = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(checkpoint, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_cached_hub_checkpoint_loads_with_the_network_cut_off(tmp_path, revision):
    processor = make_tiny_processor(image_size=84, num_image_tokens_per_crop=4)
    model = save_tiny_checkpoint(tmp_path / "checkpoint", processor)
    fill_hub_cache(tmp_path / "hub", tmp_path / "checkpoint")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, REPO_ID, revision, str(tmp_path / "image.png")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    lines = result.stdout.strip().splitlines()
    lines = dict(line.split(" ", 1) for line in lines if line.startswith(("ids", "pipeline")))
    assert lines["ids"] == str(expected.tolist())
    assert lines["pipeline"] == repr(processor.decode(expected, skip_special_tokens=True))
