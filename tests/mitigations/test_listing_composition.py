"""`clearsight mitigations` lists every method with its parameters; composition of methods in one request."""

from __future__ import annotations

import warnings

import pytest
from mithelp import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.cli import main
from clearsight.kernels.plan import PlanConflictError
from clearsight.mitigations import parse_mitigations

METHODS = ("var", "pai", "imbalanced", "vhr", "cca", "mma")


def test_cli_lists_methods_with_described_parameters(capsys):
    assert main(["mitigations"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} (plan):" in "\n" + out
    assert "p_semantics = 'paper'" in out and "paper: p is moved; code: p is kept" in out
    assert "text_pass = 'branch'" in out and "head_spread = 0.5" in out


def test_config_dicts_and_cli_strings_agree():
    a = parse_mitigations(["var:p=0.4,p_semantics=code,sink_dims=1|2", "vhr:layers=1"])
    b = parse_mitigations([{"name": "var", "p": 0.4, "p_semantics": "code", "sink_dims": [1, 2]},
                           {"name": "vhr", "layers": [1]}])
    assert a == b


def test_compositions():
    lvlm = tiny("tiny-llava")
    req = {"prompt": "what is in the picture?", "image": make_image(9)}
    decode = DecodeSpec(max_new_tokens=3, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for combo in (["var:sink_dims=1,tau=3", "vhr"], ["pai", "vhr:text_pass=probe", "cca"],
                      ["imbalanced", "pai:gamma=1", "mma"], ["var:sink_dims=1,tau=3", "pai", "mma"]):
            assert len(generate(lvlm, [req], combo, decode=decode)[0].token_ids) == 3
        with pytest.raises(PlanConflictError, match="cannot be combined in one request"):
            generate(lvlm, [req], ["mma", "cca"], decode=decode)
