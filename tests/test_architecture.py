"""The package's shape: layers kept (import-linter), small files, one declaration per option."""
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sonocad.cli.commands import _config
from sonocad.cli.main import build_parser
from sonocad.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sonocad"


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_layers_contract_is_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and " kept, 0 broken" in r.stdout, r.stdout[-3000:]


def test_modules_live_in_packages_that_show_the_layers():
    loose = sorted(p.stem for p in SRC.glob("*.py"))
    assert loose == ["__init__", "__main__", "config", "errors", "version"], loose


def test_no_import_cycle():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("sonocad")
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(n) == "open":
                raise AssertionError(" -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        state[m] = "done"
        path.pop()

    for m in sorted(graph.modules):
        if m not in state:
            visit(m)


def _train_options():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_every_config_field_is_a_documented_option():
    options = _train_options()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f"--{f.name.replace('_', '-')} missing"
        assert options[f.name].help == f.metadata["help"] and f.metadata["help"]
        if f.metadata.get("choices"):
            assert list(options[f.name].choices) == list(f.metadata["choices"])


def test_options_once_hidden_are_reachable():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    args = sub.choices["train"].parse_args(["d", "--weight-decay", "0.001", "--hidden", "64", "--no-cache-features",
                                            "--feature-views", "2", "--no-pretrained", "--tta-zooms"])
    cfg = _config(args)
    assert (cfg.weight_decay, cfg.hidden, cfg.cache_features, cfg.feature_views) == (0.001, 64, False, 2)
    assert cfg.pretrained is False and cfg.tta_zooms == [] and cfg.tta is True
    default = _config(sub.choices["train"].parse_args(["d"]))
    assert default == TrainConfig().validate()         # options not given leave the recipe's preset
    nb = _config(sub.choices["train"].parse_args(["d", "--recipe", "notebook", "--batch-size", "4"]))
    assert nb == TrainConfig.from_recipe("notebook", batch_size=4)


def test_choices_are_checked_once_for_library_and_cli(capsys):
    from sonocad.cli.main import main
    from sonocad.errors import OptionError

    with pytest.raises(OptionError, match="^precision: must be auto, fp32, bf16 or fp16, not 'fp64'"):
        TrainConfig(precision="fp64").validate()
    with pytest.raises(OptionError, match="^head_lr: must be a positive number, not inf"):
        TrainConfig(head_lr=float("inf")).validate()
    assert main(["train", "d", "--out", "o", "--weight-decay", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("sonocad: error: --weight-decay: must be a number of at least 0, "
                                               "not -1.0")
