"""--config files, reproducing a run from its saved config, and loading that runs no foreign code."""
import json

import pytest

from loraprune.core.config import PruneConfig
from loraprune.errors import UserError
from test_cli_prune import cli, tiny_args


def test_config_file_flags_override_and_saved_config_reproduces(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("ratio: 0.3\nsteps: 3\nlora_r: 4\n")
    out = tmp_path / "a"
    r = cli(*tiny_args(model, text_file, out, "--config", cfg_file, "--no-export"))  # tiny_args passes --steps 6
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "loraprune_config.json").read_text())
    assert saved["ratio"] == 0.3 and saved["lora_r"] == 4 and saved["steps"] == 6
    assert json.loads((out / "report.json").read_text())["config"] == saved
    again = tmp_path / "b"
    r = cli("prune", "--config", out / "loraprune_config.json", "--out", again)
    assert r.returncode == 0, r.stderr
    assert (again / "masks.json").read_text() == (out / "masks.json").read_text()
    assert json.loads((again / "report.json").read_text())["losses"] == json.loads(
        (out / "report.json").read_text())["losses"]


def test_unknown_config_key_is_rejected(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"ratio": 0.2, "raito": 0.3}))
    with pytest.raises(UserError, match="raito"):
        PruneConfig.from_file(str(f))


def test_foreign_model_code_never_runs_without_the_flag(tmp_path):
    """A model directory that ships its own modeling code: refused unless --trust-remote-code."""
    from loraprune.models import load_model

    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "EXECUTED"
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match="trust-remote-code"):
        load_model(str(d))
    assert not marker.exists()
    r = cli("prune", "--model", d, "--out", tmp_path / "o")
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr and not marker.exists()
