"""The README's Python quick start runs as written, on synthetic phantoms, so it cannot go stale."""
import re
from pathlib import Path

import pytest

from sonocad import config
from sonocad.data.synth import write_phantom_set

README = Path(__file__).resolve().parents[1] / "README.md"
# the default recipe at phantom scale: what the quick start shows, not how well it does
FAST = dict(img_size=64, head_epochs=3, finetune_epochs=1, batch_size=8)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_a_python_quick_start():
    blocks = python_blocks()
    assert blocks and all("import sonocad" in b for b in blocks)


@pytest.mark.parametrize("block", python_blocks())
def test_python_quick_start_runs(block, tmp_path, monkeypatch, capsys):
    for folder, seed in (("scans", 3), ("other_scans", 4), ("local_scans", 5)):
        write_phantom_set(tmp_path / folder, n=24, seed=seed, size=64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(config.RECIPES, "default", FAST)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.search(r"test AUC \d\.\d{3} \(95% CI \d\.\d{3}-\d\.\d{3}\)", printed), printed
    assert namespace["p"].shape == (1,) and 0 <= namespace["p"][0] <= 1
    assert namespace["label"][0] in ("benign", "malignant")
    assert {"auc", "auc_ci"} <= set(namespace["other"])
    assert (tmp_path / "runs" / "ours-local" / "run.json").is_file()
    assert namespace["local"]["operating_points"]["high_sensitivity"]["promised_sensitivity"] > 0
